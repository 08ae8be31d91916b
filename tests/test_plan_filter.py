"""A model's filter must be grounded in the question (for a join, in every
condition); parts a filter skipped and answers the judge gave no verdict on
are said; the CLI's plan line, dry run, --filter '' and eval checks."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from rlm_graph import arun
from rlm_graph.cli import _check_writable, main
from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError
from rlm_graph.nodes.plan import apply_model_plan, make_plan
from rlm_graph.source import source_from_text
from rlm_graph.testing import ModelRequest

from .conftest import excerpt_of, numbered_paragraphs, text_reply

LOG = "\n".join(
    f"2026-01-01T10:{i // 60:02d}:{i % 60:02d} {'ERROR' if i % 3 == 0 else 'INFO'} "
    f"user={'alice' if i % 2 else 'bob'} request id={1000 + i} took {100 + i} ms"
    for i in range(240)
)
ERRORS = sum(1 for line in LOG.splitlines() if " ERROR " in line)
COUNT_Q = "How many ERROR lines are there?"
JOIN_LOG = "\n".join(
    f"2024-01-{1 + i % 28:02d} {('shipping', 'refund')[i % 2]} record "
    f"user=U{i % 9} amount={i}"
    for i in range(120)
)
JOIN_Q = "List the users who have both a refund record and a shipping record."
SETTINGS = {"model": "scripted/m", "context_window": 4096, "planner": "model"}


def rules_for(question: str, text: str, **config):
    source = source_from_text(text)
    plan = make_plan(
        question, source, RunConfig(**{**SETTINGS, **config}), count=len, window=4096
    )
    return plan, source


def plan_reply(**fields) -> dict:
    return {"kind": "", "sub_question": "", "chunk_tokens": 0, "filter": "", **fields}


def count_lines(request: ModelRequest) -> str:
    """A worker double for the count question: the span's ERROR lines, quoted."""
    if "Preview of the source" in request.prompt:
        return json.dumps(plan_reply(kind="count", filter="user=alice request id=100"))
    lines = [ln for ln in (excerpt_of(request) or "").split("\n") if " ERROR " in ln]
    return json.dumps({"count": len(lines), "quotes": lines})


# -- 1a. the model's filter is grounded in the question ------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["ERROR", r"\bERRORS?\b", "(?i)error", "ERROR|FATAL", r"ERROR|\d{4}"],
)
def test_model_filter_made_of_the_questions_words_is_taken(pattern):
    rules, source = rules_for(COUNT_Q, LOG)

    plan = apply_model_plan(rules, plan_reply(kind="count", filter=pattern), source)

    assert plan.filter == pattern and plan.made_by == "model"


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("user=alice request id=100", "'user' is not a word of it"),
        ("ERROR.*alice", "'alice' is not a word of it"),
        (r"\d+ ms", "'ms' is not a word of it"),
        (r"[A-Z]{5}", "no literal word"),
        ("ERROR user=(alice|bob)", "'user' is not a word of it"),
    ],
)
def test_model_filter_with_words_the_question_never_says_is_rejected(pattern, why):
    rules, source = rules_for(COUNT_Q, LOG)

    plan = apply_model_plan(rules, plan_reply(kind="count", filter=pattern), source)

    assert plan.filter is None
    assert "not grounded in the question" in plan.made_by and why in plan.made_by


async def test_an_ungrounded_model_filter_no_longer_loses_most_of_a_count(scripted):
    """ut5 repro: the planner proposed "user=alice request id=100" for a count of
    ERROR lines; the run read 5 of 115 and said done."""
    double = scripted(count_lines)

    result = await arun(COUNT_Q, text=LOG, chunk_tokens=400, **SETTINGS)

    assert result.answer == ERRORS and result.status == "done"
    assert result.plan["filter"] is None and result.skipped_parts == 0
    assert "not grounded" in result.plan["made_by"]
    leaves = [r for r in double.requests if excerpt_of(r)]
    assert len(leaves) == result.parts > 1


# -- 7. a join's model filter looks for every condition -----------------------------


@pytest.mark.parametrize(
    ("pattern", "taken"),
    [
        ("refund", False),
        ("shipping", False),
        ("record", False),  # both conditions say it: it finds neither by its own words
        ("refund|shipping", True),
        (r"\b(refund|shipp?ing)\b", True),
        (r"user=U\d+", False),  # no condition's word at all
    ],
)
def test_join_model_filter_must_look_for_every_condition(pattern, taken):
    rules, source = rules_for(JOIN_Q, JOIN_LOG)
    assert rules.kind == "join" and len(rules.conditions) == 2

    plan = apply_model_plan(rules, plan_reply(kind="join", filter=pattern), source)

    assert (plan.filter == pattern) is taken
    if not taken:
        assert plan.filter is None and "filter:" in plan.made_by
        assert "matches nowhere" not in plan.made_by


def test_join_from_the_models_conditions_checks_its_filter_against_them():
    rules, source = rules_for(
        "List the users with refund records or shipping records.", JOIN_LOG
    )
    assert rules.kind == "list"
    reply = plan_reply(
        kind="join",
        filter="refund",
        conditions=["have a refund record", "have a shipping record"],
        entity="users",
    )

    plan = apply_model_plan(rules, reply, source)

    assert plan.kind == "join" and plan.filter is None
    assert "condition 2" in plan.made_by


# -- 1b. the CLI says when a filter skipped parts unread -----------------------------


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def log_file(tmp_path, text=LOG):
    path = tmp_path / "app.log"
    path.write_text(text)
    return str(path)


def run_on_log(tmp_path, question: str, *flags: str):
    """``rlm-graph run`` on the test log with the scripted model and a 4K window."""
    return cli(
        "run", log_file(tmp_path), "-q", question,
        "--model", "scripted/m", "--context-window", "4096", *flags,
    )


ID_Q = "How many ERROR lines for request id=1003 are there?"


def id_lines(request: ModelRequest) -> str:
    if "Preview of the source" in request.prompt:
        return json.dumps(plan_reply(kind="count", filter="id=1003"))
    lines = [ln for ln in (excerpt_of(request) or "").split("\n") if "id=1003 " in ln]
    return json.dumps({"count": len(lines), "quotes": lines})


def test_cli_says_which_filter_skipped_how_many_parts(scripted, tmp_path):
    scripted(id_lines)
    common = ("--chunk-tokens", "400", "--store", "memory")

    by_model = run_on_log(tmp_path, ID_Q, *common, "--planner", "model")
    as_json = run_on_log(tmp_path, ID_Q, *common, "--planner", "model", "--json")
    by_flag = run_on_log(
        tmp_path, ID_Q, *common, "--planner", "rules", "--filter", "id=1003"
    )

    assert by_model.exit_code == 0, by_model.output
    said = re.search(
        r"the plan's filter 'id=1003' \(made by model\) "
        r"skipped (\d+) of (\d+) parts unread",
        by_model.stdout,
    )
    assert said is not None, by_model.stdout
    skipped, parts = int(said.group(1)), int(said.group(2))
    assert 0 < skipped < parts
    data = json.loads(as_json.stdout)
    assert (data["skipped_parts"], data["parts"]) == (skipped, parts)
    assert (
        data["plan"]["filter"] == "id=1003"
        and "filter" not in data["plan"]["overridden"]
    )
    assert by_flag.exit_code == 0, by_flag.output
    assert (
        f"'id=1003' (given by --filter) skipped {skipped} of {parts} parts"
        in by_flag.stdout
    )


def test_no_skip_note_without_a_filter(scripted, tmp_path):
    scripted(id_lines)
    out = run_on_log(
        tmp_path, ID_Q, "--chunk-tokens", "400", "--planner", "rules",
        "--store", "memory", "--json",
    )

    data = json.loads(out.stdout)
    assert (
        data["skipped_parts"] == 0
        and data["parts"] > 1
        and data["plan"]["filter"] is None
    )


# -- 3. --filter '' and --sub-question "" ---------------------------------------------


def test_empty_filter_flag_means_no_filter_and_beats_the_models(scripted, tmp_path):
    double = scripted(id_lines)
    common = ("--chunk-tokens", "400", "--planner", "model", "--filter", "")

    dry = run_on_log(tmp_path, ID_Q, *common, "--dry-run")
    run = run_on_log(tmp_path, ID_Q, *common, "--json")

    assert dry.exit_code == 0, dry.output
    assert (
        "pre-filter:    none" in dry.stdout
        and "set by flags: chunk_tokens, filter" in dry.stdout
    )
    assert "no filter: every piece is read" in dry.stdout
    data = json.loads(run.stdout)
    assert data["plan"]["filter"] is None and data["skipped_parts"] == 0
    assert sum(1 for r in double.requests if excerpt_of(r)) == data["parts"] > 1


def test_empty_sub_question_is_refused_in_one_line(tmp_path):
    out = cli(
        "run",
        log_file(tmp_path),
        "-q",
        ID_Q,
        "--sub-question",
        "  ",
        "--model",
        "scripted/m",
    )

    assert out.exit_code == 2, out.output
    assert "sub-question is empty" in out.stderr and "Traceback" not in out.output


# -- 4. plan line after planning, overridden overlap, dry-run wording ------------------


def test_plan_line_is_printed_once_the_models_plan_is_final(scripted, tmp_path):
    def plan_then_count(request: ModelRequest) -> str:
        if "Preview of the source" in request.prompt:
            return json.dumps(plan_reply(kind="count", chunk_tokens=300))
        return count_lines(request)

    scripted(plan_then_count)
    out = run_on_log(tmp_path, COUNT_Q, "--planner", "model", "--store", "memory")

    assert out.exit_code == 0, out.output
    lines = [ln for ln in out.stderr.splitlines() if "leaves of up to" in ln]
    assert len(lines) == 1 and "leaves of up to 300 tokens" in lines[0]
    assert "plan by model" in lines[0]


def test_overlap_flag_is_listed_as_set_and_kept_from_the_models_chunk_size():
    rules, source = rules_for(COUNT_Q, LOG, overlap_tokens=100)
    unset, _ = rules_for(COUNT_Q, LOG)
    assert (
        "overlap_tokens" in rules.overridden
        and "overlap_tokens" not in unset.overridden
    )

    plan = apply_model_plan(rules, plan_reply(kind="count", chunk_tokens=200), source)

    assert plan.overlap_tokens == 100 and plan.leaf_tokens == rules.leaf_tokens
    assert "too small for --overlap-tokens 100" in plan.made_by


def test_dry_run_names_the_filters_origin_and_a_memory_store_keeping_nothing(
    scripted, tmp_path
):
    scripted(id_lines)
    out = run_on_log(
        tmp_path, ID_Q, "--chunk-tokens", "400", "--planner", "model",
        "--store", "memory", "--dry-run",
    )

    assert out.exit_code == 0, out.output
    assert "skipped by the plan's filter (made by model):" in out.stdout
    assert "--filter:" not in out.stdout
    assert "--store memory keeps nothing, so the run pays for it again" in out.stdout
    assert "reuses it from the store" not in out.stdout


# -- 5. a judge that gives no verdict --------------------------------------------------


async def test_judge_without_a_verdict_is_asked_again_then_counted(scripted):
    text = numbered_paragraphs(6, needle_at={3: "The secret code word is TEAL."})
    judged: list[str] = []

    def judge(request: ModelRequest) -> str:
        judged.append(request.prompt)
        return "I think it is fine"

    scripted(text_reply(r"The secret code word is (\w+)\."), provider="scripted")
    scripted(judge, provider="judgedouble")
    result = await arun(
        "What is the secret code word?",
        text=text,
        judge_model="judgedouble/j",
        model="scripted/m",
        context_window=4096,
        planner="rules",
        chunk_tokens=2000,
    )

    assert result.answer == "TEAL" and result.status == "done"
    assert len(judged) == 2 and "gave no verdict" in judged[1]
    assert (result.judged_parts, result.unjudged_parts) == (1, 1)
    assert result.tree.judge == "judge-unavailable"


async def test_judge_that_answers_when_asked_again_gives_its_verdict(scripted):
    text = numbered_paragraphs(6, needle_at={3: "The secret code word is TEAL."})
    replies = iter(
        ["fine, I suppose", json.dumps({"supported": True, "reason": "stated"})]
    )

    scripted(text_reply(r"The secret code word is (\w+)\."), provider="scripted")
    scripted(lambda request: next(replies), provider="judgedouble")
    result = await arun(
        "What is the secret code word?",
        text=text,
        judge_model="judgedouble/j",
        model="scripted/m",
        context_window=4096,
        planner="rules",
        chunk_tokens=2000,
    )

    assert result.tree.judge == "supported: stated"
    assert (result.judged_parts, result.unjudged_parts) == (1, 0)


def test_cli_summary_line_says_the_judge_gave_no_verdict(scripted, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(
        numbered_paragraphs(6, needle_at={3: "The secret code word is TEAL."})
    )
    scripted(text_reply(r"The secret code word is (\w+)\."), provider="scripted")
    scripted(lambda request: "no idea", provider="judgedouble")

    out = cli(
        "run",
        str(path),
        "-q",
        "What is the secret code word?",
        "--model",
        "scripted/m",
        "--judge-model",
        "judgedouble/j",
        "--context-window",
        "4096",
        "--planner",
        "rules",
        "--store",
        "memory",
    )

    assert out.exit_code == 0, out.output
    assert "· done · judge gave no verdict on 1 of 1 answers ·" in out.stdout


# -- 2 and 6. eval checks settings and paths first; the reading double plans by rules --


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--chunk-tokens", "5"], "--chunk-tokens"),
        (["--filter", "(("], "--filter '((' is not a valid regular expression"),
        (["--context-window", "10"], "--context-window"),
        (
            ["--json", "/proc/rlm-graph-test.json"],
            "--json /proc/rlm-graph-test.json: cannot be written",
        ),
        (
            ["--chart", "/proc/rlm-graph-test.png"],
            "--chart /proc/rlm-graph-test.png: cannot be written",
        ),
    ],
)
def test_eval_refuses_bad_settings_and_paths_in_one_line(flags, words):
    out = cli("eval", "--reading-double", "--sizes", "1k", *flags)

    assert out.exit_code == 2, out.output
    assert words in out.stderr and "Traceback" not in out.output
    assert "|" not in out.stdout  # refused before any row ran


def test_writable_check_leaves_no_file_behind_and_keeps_an_existing_one(tmp_path):
    new = tmp_path / "rows.json"
    old = tmp_path / "old.json"
    old.write_text("kept")

    _check_writable("--json", str(new))
    _check_writable("--json", str(old))

    assert not new.exists() and old.read_text() == "kept"
    with pytest.raises(ConfigError, match="is a folder"):
        _check_writable("--json", str(tmp_path))


def test_eval_with_the_reading_double_plans_by_rules_and_marks_reference_prices(
    tmp_path,
):
    rows = tmp_path / "rows.json"

    out = cli(
        "eval",
        "--reading-double",
        "--sizes",
        "1k",
        "--method",
        "rlm",
        "--depths",
        "0.5",
        "--json",
        str(rows),
    )

    assert out.exit_code == 0, out.output
    data = json.loads(rows.read_text())
    assert [r["run"]["plan_made_by"] for r in data] == ["rules"]
    assert data[0]["run"]["calls"] == 1  # no planning call the double cannot answer
    assert "cost at gpt-4o-mini reference prices" in out.stdout
    assert re.search(r"\| 0\.\d{4}\* \|", out.stdout)
    assert "rules with --reading-double" in " ".join(
        cli("eval", "--help").output.split()
    )
