"""Answer kinds table, yes/no and schema: verify, code merges, whole runs."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from rlm_graph import ConfigError, arun
from rlm_graph.cli import main
from rlm_graph.models import Completion
from rlm_graph.nodes.merge import merge_by_code, merge_records, merge_table, merge_yesno
from rlm_graph.nodes.plan import guess_kind
from rlm_graph.nodes.types import Answer, Evidence, Record, Row, Task
from rlm_graph.nodes.verify import verify_leaf
from rlm_graph.testing import ModelRequest, Reply

from .conftest import excerpt_of

SETTINGS = {
    "model": "scripted/m",
    "context_window": 4096,
    "chunk_tokens": 120,
    "overlap_tokens": 24,
}
TEXT = "Ticket 1: label refund.\nTicket 2: label shipping.\nTicket 3: label refund.\n"


def reply(content: dict) -> Completion:
    return Completion(
        text=json.dumps(content),
        finish_reason="stop",
        prompt_tokens=9,
        completion_tokens=9,
    )


def whole(question: str = "Q?") -> Task:
    return Task(id="0.1", start=0, end=len(TEXT), depth=1, question=question, tokens=30)


def ev(start: int, end: int) -> Evidence:
    return Evidence(quote="x" * (end - start), start=start, end=end)


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ("How many tickets per label?", "table"),
        ("Which label is most common?", "table"),
        ("Is the refund policy mentioned?", "yesno"),
        ("Does the captain survive?", "yesno"),
        ("How many tickets are there?", "count"),
    ],
)
def test_kind_from_wording(question, kind):
    assert guess_kind(question) == kind


# -- verify ---------------------------------------------------------------------


def test_table_rows_are_located_with_offsets():
    verdict = verify_leaf(
        TEXT,
        whole(),
        "table",
        reply(
            {
                "rows": [
                    {
                        "label": "refund",
                        "count": 2,
                        "quotes": ["Ticket 1: label refund", "ticket 3:  LABEL refund"],
                    },
                    {
                        "label": "shipping",
                        "count": 1,
                        "quotes": ["Ticket 2: label shipping"],
                    },
                ]
            }
        ),
    )

    assert verdict.ok and verdict.answer.value == {"refund": 2, "shipping": 1}
    third = verdict.answer.rows[0].evidence[1]
    assert TEXT[third.start : third.end] == "Ticket 3: label refund"


def test_table_row_with_invented_quotes_is_rejected():
    verdict = verify_leaf(
        TEXT,
        whole(),
        "table",
        reply(
            {
                "rows": [
                    {
                        "label": "billing",
                        "count": 1,
                        "quotes": ["Ticket 9: label billing"],
                    },
                ]
            }
        ),
    )
    assert (
        not verdict.ok
        and verdict.code == "no-evidence"
        and "billing" in verdict.feedback
    )


def test_yesno_needs_a_quote_from_the_span():
    ok = verify_leaf(
        TEXT,
        whole(),
        "yesno",
        reply({"answer": "yes", "quote": "Ticket 2: label shipping."}),
    )
    made_up = verify_leaf(
        TEXT,
        whole(),
        "yesno",
        reply({"answer": "no", "quote": "No tickets were filed."}),
    )
    silent = verify_leaf(
        TEXT, whole(), "yesno", reply({"answer": "not stated", "quote": ""})
    )
    odd = verify_leaf(TEXT, whole(), "yesno", reply({"answer": "maybe", "quote": ""}))

    assert (
        ok.ok
        and ok.answer.value is True
        and ok.answer.evidence[0].start == TEXT.index("Ticket 2")
    )
    assert made_up.code == "no-evidence"
    assert silent.ok and not silent.answer.found and silent.answer.value is False
    assert odd.code == "malformed"


SCHEMA = {
    "type": "object",
    "properties": {"ticket": {"type": "integer"}, "label": {"type": "string"}},
    "required": ["ticket", "label"],
}


def test_schema_records_are_validated_and_located():
    good = verify_leaf(
        TEXT,
        whole(),
        "schema",
        reply(
            {
                "records": [
                    {
                        "ticket": 1,
                        "label": "refund",
                        "quote": "Ticket 1: label refund.",
                    },
                ]
            }
        ),
        SCHEMA,
    )
    bad = verify_leaf(
        TEXT,
        whole(),
        "schema",
        reply(
            {
                "records": [
                    {
                        "ticket": "one",
                        "label": "refund",
                        "quote": "Ticket 1: label refund.",
                    },
                ]
            }
        ),
        SCHEMA,
    )

    assert good.ok and good.answer.value == [{"ticket": 1, "label": "refund"}]
    assert good.answer.records[0].evidence.start == 0
    assert bad.code == "malformed" and "records[0].ticket" in bad.feedback


# -- merge ----------------------------------------------------------------------


def test_table_merge_sums_labels_and_drops_overlap_duplicates():
    left = Answer(
        kind="table",
        found=True,
        rows=(
            Row(label="refund", count=2, evidence=(ev(0, 10), ev(50, 60))),
            Row(label="shipping", count=1, evidence=(ev(20, 30),)),
        ),
    )
    # The right span overlaps the left one and saw the occurrence at 50-60 again.
    right = Answer(
        kind="table",
        found=True,
        rows=(Row(label="Refund", count=2, evidence=(ev(50, 60), ev(90, 99))),),
    )

    merged = merge_table([left, right])
    assert merged.value == {"refund": 3, "shipping": 1}


def test_yesno_merge_any_evidenced_yes_wins():
    yes = Answer(kind="yesno", found=True, flag=True, evidence=(ev(5, 15),))
    no = Answer(kind="yesno", found=True, flag=False, evidence=(ev(30, 40),))
    silent = Answer(kind="yesno", found=False)

    assert merge_yesno([no, yes, silent]).value is True
    assert merge_yesno([no, silent]).value is False
    assert merge_yesno([silent]).found is False
    assert merge_yesno([no, yes]).evidence == (ev(5, 15),)


def test_records_merge_by_place_not_content():
    a = Record(data={"ticket": 1, "label": "refund"}, evidence=ev(0, 10))
    same_span = Record(data={"ticket": 1, "label": "Refund "}, evidence=ev(0, 10))
    same_data = Record(data={"ticket": 1, "label": "refund"}, evidence=ev(70, 80))
    other = Record(data={"ticket": 3, "label": "refund"}, evidence=ev(40, 50))

    merged = merge_records(
        [
            Answer(kind="schema", found=True, records=(a, other)),
            Answer(kind="schema", found=True, records=(same_span, same_data)),
        ]
    )
    # The same place twice is one record; equal data at another place is another.
    assert merged.value == [
        {"ticket": 1, "label": "refund"},
        {"ticket": 3, "label": "refund"},
        {"ticket": 1, "label": "refund"},
    ]


def test_free_text_is_not_merged_by_code():
    with pytest.raises(ValueError, match="root model"):
        merge_by_code("text", [])


# -- whole runs with the scripted double ------------------------------------------

TICKETS = "".join(
    f"Ticket {n}: label {('refund', 'shipping', 'billing')[n % 3 if n % 5 else 0]}. "
    "The customer wrote a long letter about the parcel and waited for an answer.\n"
    for n in range(1, 61)
)
TICKET = re.compile(r"Ticket (\d+): label (\w+)\.")


def table_reader(request: ModelRequest) -> Reply | str:
    rows: dict[str, list[str]] = {}
    for m in TICKET.finditer(excerpt_of(request) or ""):
        rows.setdefault(m.group(2), []).append(m.group(0))
    return json.dumps(
        {"rows": [{"label": k, "count": len(v), "quotes": v} for k, v in rows.items()]}
    )


async def test_table_run_is_exact_over_many_overlapping_spans(scripted):
    scripted(table_reader)
    truth: dict[str, int] = {}
    for m in TICKET.finditer(TICKETS):
        truth[m.group(2)] = truth.get(m.group(2), 0) + 1

    result = await arun(
        "How many tickets are there per label?", text=TICKETS, **SETTINGS
    )

    assert result.kind == "table" and result.status == "done"
    assert _leaves(result.tree) > 3, "many spans, overlapping"
    assert result.answer == truth
    assert sum(truth.values()) == 60 == len(result.citations)


def _leaves(node) -> int:
    return 1 if not node.children else sum(_leaves(c) for c in node.children)


async def test_yesno_run(scripted):
    text = TICKETS.replace("Ticket 44: label", "Ticket 44: escalated to legal; label")

    def reader(request: ModelRequest) -> str:
        match = re.search(r"Ticket \d+: escalated to legal", excerpt_of(request) or "")
        if match:
            return json.dumps({"answer": "yes", "quote": match.group(0)})
        return json.dumps({"answer": "not stated", "quote": ""})

    scripted(reader)
    result = await arun("Was any ticket escalated to legal?", text=text, **SETTINGS)

    assert result.kind == "yesno" and result.answer is True
    assert [c.quote for c in result.citations] == ["Ticket 44: escalated to legal"]


class TicketRecord(BaseModel):
    ticket: int
    label: str


def record_reader(request: ModelRequest) -> str:
    return json.dumps(
        {
            "records": [
                {"ticket": int(m.group(1)), "label": m.group(2), "quote": m.group(0)}
                for m in TICKET.finditer(excerpt_of(request) or "")
                if m.group(2) == "billing"
            ]
        }
    )


async def test_schema_run_with_a_pydantic_model(scripted):
    double = scripted(record_reader)

    result = await arun(
        "Which tickets are about billing?",
        text=TICKETS,
        schema=TicketRecord,
        **SETTINGS,
    )

    assert result.kind == "schema"
    assert all(isinstance(r, TicketRecord) for r in result.answer)
    expected = [
        int(m.group(1)) for m in TICKET.finditer(TICKETS) if m.group(2) == "billing"
    ]
    assert [r.ticket for r in result.answer] == expected
    sent = double.requests[0].response_format["json_schema"]["schema"]
    assert sent["properties"]["records"]["items"]["required"] == [
        "ticket",
        "label",
        "quote",
    ]


def test_cli_schema_file(scripted, tmp_path):
    scripted(record_reader)
    schema = tmp_path / "ticket.json"
    schema.write_text(json.dumps(SCHEMA))
    source = tmp_path / "tickets.txt"
    source.write_text(TICKETS)

    out = CliRunner().invoke(
        main,
        [
            "run",
            str(source),
            "-q",
            "Which tickets are about billing?",
            "--schema",
            str(schema),
            "--model",
            "scripted/m",
            "--context-window",
            "4096",
            "--chunk-tokens",
            "120",
            "--json",
        ],
    )

    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["kind"] == "schema" and data["plan"]["kind"] == "schema"
    assert {"ticket": 2, "label": "billing"} in data["answer"]
    assert {"ticket": 5, "label": "refund"} not in data["answer"]


def test_cli_rejects_a_schema_that_is_not_one_record(tmp_path):
    schema = tmp_path / "bad.json"
    schema.write_text(json.dumps({"type": "array"}))
    source = tmp_path / "t.txt"
    source.write_text(TICKETS)

    out = CliRunner().invoke(
        main,
        [
            "run",
            str(source),
            "-q",
            "Q?",
            "--schema",
            str(schema),
            "--model",
            "scripted/m",
        ],
    )

    assert out.exit_code == 2
    assert "must describe one record" in out.stderr and "Traceback" not in out.output


def test_schema_kind_without_a_schema_says_what_to_pass():
    from rlm_graph.api import prepare

    with pytest.raises(ConfigError, match="--schema FILE"):
        prepare("Q?", text=TICKETS, kind="schema", **SETTINGS)
