"""Strict verification: rejected spans fail, counts are tied to their quotes,
replies without their kind's key are malformed, repeated quotes are placed at
distinct occurrences, and a yes/no without evidence is a "no"."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from click.testing import CliRunner

from rlm_graph import arun
from rlm_graph.cli import main
from rlm_graph.models import Completion
from rlm_graph.nodes.merge import merge_count, merge_table
from rlm_graph.nodes.types import Answer, Evidence, Row, Task
from rlm_graph.nodes.verify import Claims, locate_quote, verify_leaf
from rlm_graph.testing import ModelRequest

from .conftest import count_reply, excerpt_of

SETTINGS = {
    "model": "scripted/m",
    "context_window": 4096,
    "chunk_tokens": 120,
    "overlap_tokens": 24,
}
TICKETS = "".join(
    f"Ticket {n}: label {('refund', 'shipping', 'billing')[n % 3]}. "
    "The customer wrote a long letter about the parcel and waited.\n"
    for n in range(1, 61)
)
TICKET = re.compile(r"Ticket \d+: label refund\.")
SMALL = "Ticket 1: label refund.\nTicket 2: label shipping.\nTicket 3: label refund.\n"


def reply(content: dict | str) -> Completion:
    text = content if isinstance(content, str) else json.dumps(content)
    return Completion(
        text=text, finish_reason="stop", prompt_tokens=9, completion_tokens=9
    )


def task(text: str = SMALL, question: str = "How many refunds?") -> Task:
    return Task(id="0.1", start=0, end=len(text), depth=1, question=question, tokens=30)


def ev(start: int, end: int) -> Evidence:
    return Evidence(quote="x" * (end - start), start=start, end=end)


# -- 1. a span whose every answer is rejected is a failure ------------------------


def lying_about(marker: str):
    """A count double that makes up its quotes for every span holding ``marker``
    and counts honestly elsewhere."""
    honest = count_reply(TICKET.pattern)

    def respond(request: ModelRequest) -> str:
        if marker in (excerpt_of(request) or ""):
            return json.dumps({"count": 3, "quotes": ["Ticket 999: label refund."] * 3})
        return honest(request)

    return respond


async def test_span_whose_every_answer_is_rejected_is_a_failure_not_a_zero(scripted):
    double = scripted(lying_about("Ticket 31:"))

    result = await arun(
        "How many tickets have the label refund?", text=TICKETS, **SETTINGS
    )

    assert result.status == "partial"
    assert result.failures, "the made-up span is listed"
    for failure in result.failures:
        span = TICKETS[failure.start : failure.end]
        assert "Ticket 31:" in span
        assert (
            "rejected" in failure.reason
            and "do not occur in the excerpt" in failure.reason
        )
    # What was verified still counts: every record some answered span holds.
    answered = [(n.start, n.end) for n in _leaves(result.tree) if n.status == "done"]
    held = {
        m.start()
        for m in TICKET.finditer(TICKETS)
        if any(a <= m.start() and m.end() <= b for a, b in answered)
    }
    assert result.answer == len(held) < len(TICKET.findall(TICKETS))
    lies = [r for r in double.requests if "Ticket 31:" in (excerpt_of(r) or "")]
    assert len(lies) >= 2, "asked again with the reason before giving up"


async def test_run_whose_every_span_lies_fails_instead_of_answering_zero(scripted):
    scripted(lying_about("Ticket"))

    result = await arun(
        "How many tickets have the label refund?", text=TICKETS, **SETTINGS
    )

    assert result.status == "failed" and result.failures
    assert not result.found


def test_cli_says_a_partial_answer_is_partial(scripted, tmp_path):
    scripted(lying_about("Ticket 31:"))
    source = tmp_path / "tickets.txt"
    source.write_text(TICKETS)

    out = CliRunner().invoke(
        main,
        [
            "run",
            str(source),
            "-q",
            "How many tickets have the label refund?",
            "--model",
            "scripted/m",
            "--context-window",
            "4096",
            "--chunk-tokens",
            "120",
        ],
    )

    assert out.exit_code == 1, out.output
    assert "partial answer" in out.stdout and "could not be answered" in out.stdout
    assert "· partial ·" in out.stdout and "· done ·" not in out.stdout
    assert "was not answered" in out.stderr


# -- 2. a count is tied to its quotes ---------------------------------------------


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        ({"count": 50, "quotes": []}, "unbacked", "counted 50 but quoted 0"),
        ({"count": 50}, "unbacked", "counted 50 but quoted 0"),
        (
            {
                "count": 1,
                "quotes": ["Ticket 1: label refund", "Ticket 3: label refund"],
            },
            "unbacked",
            "counted 1 but quoted 2",
        ),
        (
            {
                "count": 2,
                "quotes": ["Ticket 1: label refund", "Ticket 7: label refund"],
            },
            "no-evidence",
            "Ticket 7",
        ),
        (
            {
                "count": 2,
                "quotes": ["Ticket 1: label refund", "Ticket 1: label refund"],
            },
            "no-evidence",
            "1 of your quotes repeat a line that occurs fewer times",
        ),
        ({"count": 2.5, "quotes": []}, "malformed", "whole number"),
        ({"count": -1, "quotes": []}, "malformed", "negative"),
        ({"count": "2", "quotes": []}, "malformed", "whole number"),
        ({"count": True, "quotes": []}, "malformed", "whole number"),
    ],
    ids=[
        "no-quotes",
        "quotes-missing",
        "fewer-counted",
        "made-up-quote",
        "same-occurrence-twice",
        "fraction",
        "negative",
        "string",
        "bool",
    ],
)
def test_count_is_rejected_unless_its_quotes_back_it(content, code, words):
    verdict = verify_leaf(SMALL, task(), "count", reply(content))

    assert not verdict.ok and verdict.code == code
    assert words in verdict.feedback


def test_count_equal_to_its_distinct_quotes_is_accepted():
    quotes = ["Ticket 1: label refund", "ticket 3:  LABEL refund."]
    verdict = verify_leaf(
        SMALL, task(), "count", reply({"count": 2.0, "quotes": quotes})
    )

    assert verdict.ok and verdict.answer.count == 2
    assert [SMALL[e.start : e.end] for e in verdict.answer.evidence] == [
        "Ticket 1: label refund",
        "Ticket 3: label refund.",
    ]
    empty = verify_leaf(SMALL, task(), "count", reply({"count": 0, "quotes": []}))
    assert empty.ok and empty.answer.count == 0 and not empty.answer.found


def test_table_row_is_tied_to_its_quotes():
    def rows(count: int, quotes: list[str]) -> Completion:
        return reply({"rows": [{"label": "refund", "count": count, "quotes": quotes}]})

    both = ["Ticket 1: label refund", "Ticket 3: label refund"]
    assert verify_leaf(SMALL, task(), "table", rows(2, both)).ok
    unbacked = verify_leaf(SMALL, task(), "table", rows(5, both))
    assert unbacked.code == "unbacked" and "'refund'" in unbacked.feedback
    assert verify_leaf(SMALL, task(), "table", rows(1.5, both)).code == "malformed"
    twice = reply(
        {
            "rows": [
                {"label": "refund", "count": 1, "quotes": ["Ticket 1: label refund"]},
                {"label": "Refund", "count": 1, "quotes": ["Ticket 1: label refund"]},
            ]
        }
    )
    assert verify_leaf(SMALL, task(), "table", twice).code == "no-evidence"


async def test_an_unbacked_count_is_asked_again_with_the_reason(scripted):
    honest = count_reply(TICKET.pattern)
    prompts: list[str] = []

    def respond(request: ModelRequest) -> str:
        prompts.append(request.prompt)
        if "was rejected" not in request.prompt:
            return json.dumps({"count": 50, "quotes": []})
        return honest(request)

    scripted(respond)
    result = await arun(
        "How many tickets have the label refund?", text=TICKETS, **SETTINGS
    )

    assert result.status == "done"
    assert result.answer == len(TICKET.findall(TICKETS)) == 20
    assert any("You counted 50 but quoted 0" in p for p in prompts)


def capped_counter(request: ModelRequest) -> str:
    """A count double that, like a model held to the reply schema, quotes at most 40."""
    quotes = re.findall(r"Order \d+: label refund\.", excerpt_of(request) or "")
    return json.dumps({"count": len(quotes), "quotes": quotes[:40]})


async def test_more_occurrences_than_a_reply_may_quote_split_the_span_at_once(scripted):
    text = "".join(f"Order {n:03d}: label refund.\n" for n in range(1, 121))
    double = scripted(capped_counter)

    result = await arun(
        "How many orders have the label refund?",
        text=text,
        **{**SETTINGS, "chunk_tokens": 2000},
    )

    assert result.status == "done" and result.answer == 120
    assert not any("was rejected" in r.prompt for r in double.requests), (
        "split, not asked again"
    )
    assert len(_leaves(result.tree)) >= 4, "halved until each piece holds at most 40"


# -- 3. a reply without its kind's key is malformed --------------------------------


@pytest.mark.parametrize(
    ("kind", "content", "key"),
    [
        ("count", {"total": 5}, "count"),
        ("table", {"labels": {"refund": 2}}, "rows"),
        ("table", {"rows": [{"label": "refund", "quotes": []}]}, "count"),
        ("list", {"things": ["a"]}, "items"),
        ("yesno", {"quote": "Ticket 1: label refund"}, "answer"),
        ("text", {"quote": "Ticket 1: label refund"}, "answer"),
    ],
)
def test_reply_without_its_kinds_key_is_malformed(kind, content, key):
    verdict = verify_leaf(SMALL, task(), kind, reply(content))

    assert not verdict.ok and verdict.code == "malformed"
    assert f'"{key}"' in verdict.feedback


async def test_reply_without_its_key_gets_one_corrective_reask_then_fails(scripted):
    double = scripted(lambda request: json.dumps({"total": 5}))

    result = await arun(
        "How many tickets have the label refund?", text=SMALL, **SETTINGS
    )

    assert result.status == "failed" and not result.found
    assert len(double.requests) == 2, "one re-ask; a span this small is not split"
    assert 'has no "count"' in double.requests[1].prompt
    assert "malformed" in result.failures[0].reason


# -- 4. repeated quotes and overlap de-duplication ----------------------------------


REPEATED = "Order: label refund.\n" * 5


def test_equal_quotes_are_placed_at_distinct_occurrences():
    claims = Claims()
    placed = [
        locate_quote(REPEATED, 0, len(REPEATED), "Order: label refund.", claims)
        for _ in range(5)
    ]

    assert [e.start for e in placed] == [21 * i for i in range(5)]
    assert (
        locate_quote(REPEATED, 0, len(REPEATED), "Order: label refund.", claims) is None
    )
    # Exact occurrences first, then those only the tolerant match finds.
    mixed, claims = "ORDER:  label refund. Order: label refund.", Claims()
    found = [
        locate_quote(mixed, 0, len(mixed), "Order: label refund.", claims)
        for _ in range(2)
    ]
    assert [e.start for e in found] == [22, 0]
    assert locate_quote(mixed, 0, len(mixed), "Order: label refund.", claims) is None


def test_repeated_records_are_counted_by_occurrence():
    five = reply({"count": 5, "quotes": ["Order: label refund."] * 5})
    six = reply({"count": 6, "quotes": ["Order: label refund."] * 6})

    verdict = verify_leaf(REPEATED, task(REPEATED), "count", five)
    assert verdict.ok and len({e.start for e in verdict.answer.evidence}) == 5
    assert verify_leaf(REPEATED, task(REPEATED), "count", six).code == "no-evidence"


def test_merge_counts_one_occurrence_once_and_two_occurrences_twice():
    left = Answer(kind="count", found=True, count=1, evidence=(ev(0, 24),))
    # The same record quoted with another extent, and its neighbour, whose
    # quote touches the end of the left one's.
    right = Answer(kind="count", found=True, count=2, evidence=(ev(0, 20), ev(20, 40)))
    assert merge_count([left, right]).count == 2

    # One long quote in the left part cannot stand for two occurrences of the right.
    wide = Answer(kind="count", found=True, count=1, evidence=(ev(0, 30),))
    pair = Answer(kind="count", found=True, count=2, evidence=(ev(0, 14), ev(15, 30)))
    assert merge_count([wide, pair]).count == 2

    rows = [
        Answer(
            kind="table",
            found=True,
            rows=(Row(label="refund", count=2, evidence=(ev(0, 20), ev(21, 41))),),
        ),
        Answer(
            kind="table",
            found=True,
            rows=(Row(label="Refund", count=2, evidence=(ev(21, 41), ev(42, 62))),),
        ),
    ]
    assert merge_table(rows).value == {"refund": 3}


async def test_overlap_holding_repeated_identical_records_is_counted_exactly(scripted):
    line = "Order: label refund. The parcel came late and the box was torn open.\n"
    text = line * 40
    scripted(count_reply(r"Order: label refund\."))

    result = await arun("How many orders have the label refund?", text=text, **SETTINGS)

    assert result.status == "done"
    leaves = _leaves(result.tree)
    assert len(leaves) > 3
    overlapping = sum(1 for a, b in itertools.pairwise(leaves) if b.start < a.end)
    assert overlapping >= 2, "neighbouring spans share repeated records"
    assert result.answer == 40
    assert len({c.start for c in result.citations}) == 40


def _leaves(node):
    if not node.children:
        return [node]
    return [leaf for child in node.children for leaf in _leaves(child)]


# -- 8. yes/no without evidence ------------------------------------------------------


async def test_yesno_without_evidence_is_false_with_no_evidence_found(scripted):
    scripted(lambda request: json.dumps({"answer": "not stated", "quote": ""}))

    result = await arun("Was any ticket escalated to legal?", text=TICKETS, **SETTINGS)

    assert result.kind == "yesno" and result.status == "done"
    assert result.answer is False and not result.found


def test_cli_yesno_without_evidence_says_no_evidence_found(scripted, tmp_path):
    scripted(lambda request: json.dumps({"answer": "not stated", "quote": ""}))
    source = tmp_path / "tickets.txt"
    source.write_text(TICKETS)
    out = CliRunner().invoke(
        main,
        [
            "run",
            str(source),
            "-q",
            "Was any ticket escalated to legal?",
            "--model",
            "scripted/m",
            "--context-window",
            "4096",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["answer"] is False and data["found"] is False
    human = CliRunner().invoke(
        main,
        [
            "run",
            str(source),
            "-q",
            "Was any ticket escalated to legal?",
            "--model",
            "scripted/m",
            "--context-window",
            "4096",
        ],
    )
    assert human.stdout.startswith("no (no evidence found)")


def test_quotes_that_repeat_a_line_are_told_so_not_that_they_do_not_occur():
    # Each real line quoted twice and counted twice (the issue-5 user test):
    # "do not occur" would send the model looking for lines it did copy right.
    lines = ["Ticket 1: label refund.", "Ticket 3: label refund."]
    verdict = verify_leaf(SMALL, task(), "count", reply({"count": 4, "quotes": lines + lines}))

    assert not verdict.ok and verdict.code == "no-evidence"
    assert verdict.feedback.startswith("2 of your quotes repeat a line")
    assert "do not occur" not in verdict.feedback and "Quote each occurrence once" in verdict.feedback
    mixed = verify_leaf(
        SMALL, task(), "count", reply({"count": 3, "quotes": [*lines, lines[0], "Ticket 9: label refund."]})
    )
    assert "1 of your quotes repeat a line" in mixed.feedback and "1 do not occur" in mixed.feedback
