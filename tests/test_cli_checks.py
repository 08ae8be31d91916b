"""CLI checks: --dry-run shows the plan the run follows, --schema is checked
before any call, the evaluation's prompts are reproducible and its sizes
checked, and conflicting flags are refused."""

from __future__ import annotations

import json
import tempfile

import jsonschema
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from rlm_graph import ConfigError, arun
from rlm_graph.cli import main
from rlm_graph.config import RunConfig
from rlm_graph.eval import multidoc_task, records_count_task, run_eval
from rlm_graph.eval.reader import reading_responder
from rlm_graph.nodes.prompts import schema_for
from rlm_graph.testing import ModelRequest

from .conftest import numbered_paragraphs, text_reply

NEEDLE = "The secret code word is HELIOTROPE."
TEXT = numbered_paragraphs(60, needle_at={41: NEEDLE})
QUESTION = "What is the secret code word?"
PLAN = {
    "kind": "text",
    "sub_question": "",
    "chunk_tokens": 150,
    "filter": "secret code",
}


def planner(request: ModelRequest) -> str:
    if "Preview of the source" in request.prompt:
        return json.dumps(PLAN)
    return text_reply(r"The secret code word is (\w+)\.")(request)


def is_plan(request: ModelRequest) -> bool:
    return "Preview of the source" in request.prompt


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT)
    return str(path)


MODEL = ("--model", "scripted/m", "--context-window", "4096")


# -- 5. --dry-run shows the plan the run will follow --------------------------------


def test_dry_run_with_the_model_planner_makes_the_one_plan_call_and_the_run_reuses_it(
    scripted, tmp_path
):
    double = scripted(planner)
    source = book(tmp_path)

    dry = cli("run", source, "-q", QUESTION, *MODEL, "--planner", "model", "--dry-run")

    assert dry.exit_code == 0, dry.output
    assert len(double.requests) == 1 and is_plan(double.requests[0])
    assert "planning: 1 call to the root model" in dry.stdout
    assert "plan made by model" in dry.stdout
    assert (
        "pre-filter:    secret code" in dry.stdout and "up to 150 tokens" in dry.stdout
    )

    run = cli("run", source, "-q", QUESTION, *MODEL, "--planner", "model", "--json")

    assert run.exit_code == 0, run.output
    data = json.loads(run.stdout)
    assert data["answer"] == "HELIOTROPE" and data["plan"]["made_by"] == "model"
    assert data["plan"]["filter"] == "secret code"
    assert sum(is_plan(r) for r in double.requests) == 1, (
        "the run paid no second plan call"
    )
    assert data["usage"]["cached_calls"] >= 1


def test_dry_run_json_has_the_plan_and_its_calls(scripted, tmp_path):
    scripted(planner)

    out = cli(
        "run",
        book(tmp_path),
        "-q",
        QUESTION,
        *MODEL,
        "--planner",
        "model",
        "--dry-run",
        "--json",
    )

    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["plan"]["made_by"] == "model" and data["plan"]["leaf_tokens"] == 150
    assert data["planning_calls"] == {"sent": 1, "recorded": 0}


def test_dry_run_with_rules_calls_no_model(scripted, tmp_path):
    double = scripted(planner)

    out = cli(
        "run", book(tmp_path), "-q", QUESTION, *MODEL, "--planner", "rules", "--dry-run"
    )

    assert out.exit_code == 0, out.output
    assert double.requests == []
    assert (
        "planning: by rules, no model call" in out.stdout
        and "plan made by rules" in out.stdout
    )


def test_dry_run_help_says_it_may_make_the_plan_call():
    out = cli("run", "--help")
    assert "planning call" in " ".join(out.output.split())


async def test_no_plan_call_when_flags_fix_every_planned_field(scripted):
    double = scripted(planner)

    result = await arun(
        QUESTION,
        text=TEXT,
        model="scripted/m",
        context_window=4096,
        planner="model",
        kind="text",
        sub_question=QUESTION,
        chunk_tokens=200,
        filter="secret",
    )

    assert result.answer == "HELIOTROPE"
    assert not any(is_plan(r) for r in double.requests)
    assert result.plan["made_by"] == "flags (no planning call)"


# -- 6. --schema is checked before any call; a 'quote' field works -------------------


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
            "points nowhere",
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}},
            "points outside",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "strin"}}},
            "not a valid JSON Schema",
        ),
        (
            {"type": "object", "properties": {"a": {"minLength": "three"}}},
            "not a valid JSON Schema",
        ),
    ],
    ids=["dangling-ref", "remote-ref", "bad-type", "bad-keyword-value"],
)
def test_bad_schema_is_refused_before_any_call(scripted, tmp_path, schema, words):
    double = scripted(planner)
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))

    out = cli(
        "run", book(tmp_path), "-q", "Which tickets?", "--schema", str(path), *MODEL
    )

    assert out.exit_code == 2
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.output and double.requests == []


TICKETS = "".join(
    f'Ticket {n}: the customer said "{("refund now", "ship it", "bill me")[n % 3]}".\n'
    for n in range(1, 31)
)
QUOTED = {
    "type": "object",
    "properties": {"ticket": {"type": "integer"}, "quote": {"type": "string"}},
    "required": ["ticket", "quote"],
}


def quoting_reader(request: ModelRequest) -> str:
    import re

    from .conftest import excerpt_of

    schema = request.response_format["json_schema"]["schema"]
    evidence = schema["properties"]["records"]["items"]["required"][-1]
    records = [
        {"ticket": int(m.group(1)), "quote": m.group(2), evidence: m.group(0)}
        for m in re.finditer(
            r'Ticket (\d+): the customer said "(refund now)"', excerpt_of(request) or ""
        )
    ]
    return json.dumps({"records": records})


def test_schema_with_a_quote_field_keeps_it_and_moves_the_evidence(scripted, tmp_path):
    double = scripted(quoting_reader)
    path, source = tmp_path / "schema.json", tmp_path / "tickets.txt"
    path.write_text(json.dumps(QUOTED))
    source.write_text(TICKETS)

    out = cli(
        "run",
        str(source),
        "-q",
        "Which customers asked for a refund?",
        "--schema",
        str(path),
        *MODEL,
        "--chunk-tokens",
        "120",
        "--json",
    )

    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    expected = [
        {"ticket": n, "quote": "refund now"} for n in range(1, 31) if n % 3 == 0
    ]
    assert data["answer"] == expected
    assert all("refund now" in c["quote"] for c in data["citations"])
    sent = double.requests[0].response_format["json_schema"]["schema"]["properties"][
        "records"
    ]["items"]
    assert sent["properties"]["quote"] == {"type": "string"}
    assert sent["required"] == ["ticket", "quote", "source_quote"]
    assert '"source_quote": words copied exactly' in double.requests[0].prompt


def test_wrapped_schema_keeps_every_reference_pointing_at_its_target():
    record = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["a", "b"]},
            "again": {"$ref": "#/properties/label"},
            "child": {"$ref": "#/definitions/Child"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
        },
        "definitions": {
            "Child": {"type": "object", "properties": {"name": {"type": "string"}}}
        },
        "$defs": {"Item": {"type": "integer"}},
    }
    RunConfig(answer_schema=record)  # passes the reference check
    wrapped = schema_for("schema", record)
    good = {
        "label": "a",
        "again": "b",
        "child": {"name": "x"},
        "items": [1],
        "quote": "...",
    }

    jsonschema.validate({"records": [good]}, wrapped)
    for bad in ({"again": "c"}, {"child": {"name": 3}}, {"items": ["x"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"records": [{**good, **bad}]}, wrapped)


# -- 7. the evaluation: reproducible prompts, checked sizes --------------------------


async def test_eval_prompts_hold_no_machine_path_and_repeat_exactly(scripted):
    instances = [records_count_task(6000, seed=3), multidoc_task(6000, seed=3)]
    double = scripted(reading_responder(instances), provider="scripted")
    config = RunConfig(
        model="scripted/reader", context_window=4096, chunk_tokens=600, planner="rules"
    )

    first = await run_eval(instances, config)
    prompts = [r.prompt for r in double.requests]
    double.requests.clear()
    second = await run_eval(instances, config)

    def tokens(rows):
        return [
            (
                r.instance,
                r.method,
                r.run.prompt_tokens,
                r.run.completion_tokens,
                r.run.calls,
            )
            for r in rows
        ]

    assert tokens(first) == tokens(second)
    assert sorted(r.prompt for r in double.requests) == sorted(prompts)
    assert all(tempfile.gettempdir() not in p for p in prompts)
    assert any("=== file: multidoc-6k/memo_0001.txt ===" in p for p in prompts)
    assert {(r.instance, r.method): r.score for r in first}[("count-6k", "rlm")] == 1.0


@pytest.mark.parametrize(
    "sizes", ["10q", "0", "-5k", "500", "1.5", "8k,,x", ",", "1e5"]
)
def test_eval_refuses_bad_sizes_before_anything_runs(sizes):
    out = cli("eval", "--reading-double", "--sizes", sizes)

    assert out.exit_code == 2, out.output
    assert "--sizes" in out.stderr and "Traceback" not in out.output
    assert "|" not in out.stdout


def test_eval_refuses_bad_depths():
    out = cli("eval", "--reading-double", "--sizes", "4k", "--depths", "0.5,1.5")
    assert (
        out.exit_code == 2
        and "--depths" in out.stderr
        and "Traceback" not in out.output
    )


# -- 8. conflicting flags are refused ------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (
            ["--kind", "count", "--schema", "SCHEMA"],
            "--kind count and --schema conflict",
        ),
        (["--dry-run", "--run-id", "r1"], "--run-id"),
        (["--chunk-tokens", "200", "--overlap-tokens", "80"], "--overlap-tokens 80"),
    ],
    ids=["kind-and-schema", "dry-run-and-run-id", "overlap-over-a-quarter"],
)
def test_conflicting_run_flags_are_refused(scripted, tmp_path, flags, words):
    double = scripted(planner)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(QUOTED))
    flags = [str(schema) if f == "SCHEMA" else f for f in flags]

    out = cli("run", book(tmp_path), "-q", QUESTION, *MODEL, *flags)

    assert out.exit_code == 2, out.output
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert double.requests == []


class Ticket(BaseModel):
    ticket: int


def test_api_refuses_a_kind_that_contradicts_the_schema():
    from rlm_graph.api import prepare

    with pytest.raises(ConfigError, match="conflict"):
        prepare(
            "Which tickets?",
            text=TICKETS,
            schema=Ticket,
            kind="count",
            model="scripted/m",
            context_window=4096,
        )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--reading-double", "--model", "openai/gpt-4o-mini"], "--reading-double"),
        (
            ["--reading-double", "--task", "count", "--straddle-tokens", "500"],
            "--straddle-tokens",
        ),
        (["--reading-double", "--task", "count", "--depths", "0.5"], "--depths"),
    ],
    ids=["double-and-model", "straddle-without-needles", "depths-without-needles"],
)
def test_conflicting_eval_flags_are_refused(flags, words):
    out = cli("eval", "--sizes", "4k", *flags)

    assert out.exit_code == 2, out.output
    assert words in out.stderr and "Traceback" not in out.output
