"""Answers that do not depend on luck: invented quotes are rejected, equal
records at distinct places stay distinct however the source is cut, a
backtracking filter cannot hang a run, a run with no answered part has no
answer, and a record the user's class rejects is asked again."""

from __future__ import annotations

import json
import re
import time

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, field_validator

from rlm_graph import arun
from rlm_graph.cli import main
from rlm_graph.errors import ConfigError
from rlm_graph.filtering import compile_filter, filter_matches
from rlm_graph.models import Completion
from rlm_graph.nodes.types import Task
from rlm_graph.nodes.verify import verify_leaf
from rlm_graph.testing import ModelRequest

from .conftest import excerpt_of, numbered_paragraphs

TARTS = (
    "The Queen of Hearts made some tarts on a summer day. "
    "The Knave of Hearts stole the tarts and took them quite away. "
    "Alice watched the trial from the back of the court.\n"
)
MADE_UP = {"answer": "Alice", "quote": "Alice confessed that she stole the tarts from the Queen."}
SETTINGS = {"model": "scripted/m", "context_window": 4096, "overlap_tokens": 16}
# A pattern with nested repeats: it backtracks for a long time on plain words.
BACKTRACKS = r"(?:\w+\s*)+(?:\w+\s*)+(?:\w+\s*)+[:;]"


def reply(content: dict) -> Completion:
    return Completion(text=json.dumps(content), finish_reason="stop", prompt_tokens=9, completion_tokens=9)


def whole(text: str, question: str) -> Task:
    return Task(id="0.1", start=0, end=len(text), depth=1, question=question, tokens=40)


# -- an invented quote is never evidence ---------------------------------------------


def test_made_up_quote_is_rejected_not_replaced_by_a_sentence_with_the_answer():
    verdict = verify_leaf(TARTS, whole(TARTS, "Who stole the tarts?"), "text", reply(MADE_UP))

    assert not verdict.ok and verdict.code == "no-evidence"
    assert "does not occur in the excerpt" in verdict.feedback


def test_found_quote_that_does_not_state_the_answer_is_rejected():
    quote = "Alice watched the trial from the back of the court."
    said = {"answer": "The Queen", "quote": quote}

    verdict = verify_leaf(TARTS, whole(TARTS, "Who stole the tarts?"), "text", reply(said))

    assert verdict.code == "no-evidence" and "does not state your answer" in verdict.feedback


def test_true_quote_is_still_accepted_with_its_offsets():
    quote = "The Knave of Hearts stole the tarts and took them quite away."
    said = {"answer": "The Knave of Hearts", "quote": quote}

    verdict = verify_leaf(TARTS, whole(TARTS, "Who stole the tarts?"), "text", reply(said))

    assert verdict.ok and verdict.answer.text == "The Knave of Hearts"
    (evidence,) = verdict.answer.evidence
    assert TARTS[evidence.start : evidence.end] == quote


async def test_run_whose_only_reply_is_made_up_fails_after_asking_again(scripted):
    double = scripted(lambda request: json.dumps(MADE_UP))

    result = await arun("Who stole the tarts?", text=TARTS, **SETTINGS)

    assert result.status == "failed" and result.answer is None and not result.citations
    assert len(double.requests) >= 2, "asked again with the reason"
    assert "does not occur in the excerpt" in double.requests[1].prompt
    assert "does not occur" in result.failures[0].reason


# -- equal records at distinct places are distinct -----------------------------------

LOGINS = "".join(
    ("user=alice action=login\n" if n % 7 == 3 else f"note {n}: the server rotated its logs quietly today.\n")
    for n in range(40)
)
LOGIN = re.compile(r"user=(\w+) action=(\w+)")


def login_records(request: ModelRequest) -> str:
    found = LOGIN.finditer(excerpt_of(request) or "")
    return json.dumps({"records": [{"user": m[1], "action": m[2], "quote": m[0]} for m in found]})


def login_items(request: ModelRequest) -> str:
    found = LOGIN.finditer(excerpt_of(request) or "")
    return json.dumps({"items": [{"item": m[1], "quote": m[0]} for m in found]})


SCHEMA = {
    "type": "object",
    "properties": {"user": {"type": "string"}, "action": {"type": "string"}},
    "required": ["user", "action"],
}


@pytest.mark.parametrize("kind", ["schema", "list"])
async def test_records_and_items_do_not_change_with_chunk_size(scripted, kind):
    scripted(login_records if kind == "schema" else login_items)
    extra = {"answer_schema": SCHEMA} if kind == "schema" else {"kind": "list"}
    planted = len(LOGIN.findall(LOGINS))

    one_leaf = await arun("Which logins are there?", text=LOGINS, chunk_tokens=2000, **extra, **SETTINGS)
    split = await arun("Which logins are there?", text=LOGINS, chunk_tokens=64, **extra, **SETTINGS)

    assert len(one_leaf.tree.children) == 0 < len(split.tree.children)
    assert len(one_leaf.answer) == len(split.answer) == planted == 6
    assert "judge" not in split.models, "no judge ran"
    assert [c.line for c in split.citations] == [c.line for c in one_leaf.citations]


# -- a backtracking filter is bounded ------------------------------------------------


def test_filter_search_stops_at_its_time_cap():
    text = "aaaa word " * 400
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        filter_matches(compile_filter(BACKTRACKS), text, timeout=0.2)
    assert time.monotonic() - started < 15


def test_filter_matching_only_file_headers_matches_nowhere():
    text = "=== file: logins.txt ===\nuser=alice action=login\n"

    assert not filter_matches(compile_filter(r"logins\.txt"), text)
    assert filter_matches(compile_filter(r"action=login"), text)


async def test_user_filter_that_backtracks_is_refused(scripted, monkeypatch):
    monkeypatch.setattr("rlm_graph.filtering.FILTER_SECONDS", 0.2)
    double = scripted(login_records)

    with pytest.raises(ConfigError, match="took more than"):
        await arun("Which logins?", text="aaaa word " * 400, filter=BACKTRACKS, kind="list", **SETTINGS)
    assert not double.requests


async def test_model_filter_that_backtracks_is_dropped_with_the_reason(scripted, monkeypatch):
    monkeypatch.setattr("rlm_graph.filtering.FILTER_SECONDS", 0.2)
    text = "aaaa word " * 400 + "\nThe secret code word is HELIOTROPE.\n"
    # "secret|..." is grounded in the question, so the search is what rejects it.
    plan = {
        "kind": "text", "sub_question": "What is the secret code word?", "chunk_tokens": 0,
        "filter": f"secret code:|{BACKTRACKS}",
    }

    def respond(request: ModelRequest) -> str:
        if "Preview of the source" in request.prompt:
            return json.dumps(plan)
        found = re.search(r"The secret code word is (\w+)\.", excerpt_of(request) or "")
        if found is None:
            return json.dumps({"relevant": False, "quote": "", "answer": ""})
        return json.dumps({"relevant": True, "quote": found[0], "answer": found[1]})

    scripted(respond)
    result = await arun("What is the secret code word?", text=text, planner="model", **SETTINGS)

    assert result.answer == "HELIOTROPE"
    assert result.plan["filter"] is None and "took more than" in result.plan["made_by"]


async def test_model_filter_that_matches_only_file_headers_is_dropped(scripted, tmp_path):
    # The file's name holds the question's words (so the filter is grounded);
    # its text says "secret code word" with spaces, never with underscores.
    story = tmp_path / "secret_code_word"
    story.write_text(numbered_paragraphs(8, needle_at={5: "The secret code word is OPAL."}))
    plan = {"kind": "text", "sub_question": "What is the secret code word?", "chunk_tokens": 0, "filter": "secret_code_word"}

    def respond(request: ModelRequest) -> str:
        if "Preview of the source" in request.prompt:
            return json.dumps(plan)
        found = re.search(r"The secret code word is (\w+)\.", excerpt_of(request) or "")
        if found is None:
            return json.dumps({"relevant": False, "quote": "", "answer": ""})
        return json.dumps({"relevant": True, "quote": found[0], "answer": found[1]})

    scripted(respond)
    result = await arun("What is the secret code word?", [story], planner="model", **SETTINGS)

    assert result.answer == "OPAL"
    assert result.plan["filter"] is None and "matches nowhere" in result.plan["made_by"]


# -- a run with no answered part has no answer ---------------------------------------


@pytest.mark.parametrize("kind", ["count", "list", "yesno", "table"])
async def test_failed_run_has_no_answer_of_any_kind(scripted, kind):
    scripted(lambda request: "I am unable to help with that.")

    result = await arun("Which logins are there?", text=LOGINS, kind=kind, chunk_tokens=64, **SETTINGS)

    assert result.status == "failed" and result.failures
    assert result.answer is None and not result.found


async def test_run_stopped_before_any_part_was_answered_has_no_answer(scripted):
    scripted(lambda request: "I am unable to help with that.")

    result = await arun(
        "How many logins are there?", text=LOGINS, kind="count", chunk_tokens=64,
        max_calls=2, concurrency=1, **SETTINGS,
    )

    assert result.status == "stopped" and result.answer is None
    assert any(f.status == "stopped" for f in result.failures)


def test_cli_says_no_answer_when_every_part_failed(scripted, tmp_path):
    scripted(lambda request: "I am unable to help with that.")
    source = tmp_path / "logins.txt"
    source.write_text(LOGINS)

    out = CliRunner().invoke(
        main,
        ["run", str(source), "-q", "How many logins are there?", "--model", "scripted/m",
         "--context-window", "4096", "--kind", "count", "--store", "memory"],
    )

    first = out.stdout.splitlines()[0]
    assert first == "no answer: every part failed (see failures)"
    assert out.exit_code != 0
    # Each failed part is reported once on stderr.
    warned = [line for line in out.stderr.splitlines() if "failed" in line or "warning: part" in line]
    parts = [line for line in warned if line.startswith("warning: part")]
    assert parts and len(warned) == len(parts) + 1, out.stderr  # + the one "note:" line


# -- the user's class checks each record ---------------------------------------------


class Login(BaseModel):
    user: str
    action: str

    @field_validator("user")
    @classmethod
    def _known(cls, value: str) -> str:
        if value == "mallory":
            msg = "unknown user, use the user= value of the line"
            raise ValueError(msg)
        return value


async def test_record_the_users_class_rejects_is_asked_again_not_a_crash(scripted):
    def respond(request: ModelRequest) -> str:
        found = list(LOGIN.finditer(excerpt_of(request) or ""))
        first_try = "unknown user" not in request.prompt
        records = [
            {"user": "mallory" if first_try else m[1], "action": m[2], "quote": m[0]} for m in found
        ]
        return json.dumps({"records": records})

    double = scripted(respond)
    result = await arun("Which logins are there?", text=LOGINS, schema=Login, chunk_tokens=2000, **SETTINGS)

    assert result.status == "done"
    assert [r.user for r in result.answer] == ["alice"] * 6
    assert len(double.requests) == 2 and "unknown user" in double.requests[1].prompt


async def test_record_the_users_class_always_rejects_fails_the_part(scripted):
    def respond(request: ModelRequest) -> str:
        found = LOGIN.finditer(excerpt_of(request) or "")
        return json.dumps({"records": [{"user": "mallory", "action": m[2], "quote": m[0]} for m in found]})

    scripted(respond)
    result = await arun("Which logins are there?", text=LOGINS, schema=Login, chunk_tokens=2000, **SETTINGS)

    # Every part with a login failed (parts without one, if read apart, answered
    # "none": then the run is partial with no records, else failed with none).
    assert (result.status, result.answer) in (("partial", []), ("failed", None))
    assert result.failures and all("unknown user" in f.reason for f in result.failures)
    failed = [LOGINS[f.start : f.end] for f in result.failures]
    assert sum(len(LOGIN.findall(span)) for span in failed) >= 6


# -- eval flags are checked before anything runs -------------------------------------


def eval_cli(*args: str):
    return CliRunner().invoke(main, ["eval", "--reading-double", *args])


@pytest.mark.parametrize("sizes", ["10000m", "8k,10.5m", "20000000"])
def test_eval_refuses_sizes_above_the_ceiling(sizes):
    out = eval_cli("--sizes", sizes)

    assert out.exit_code == 2, out.output
    assert "at most 10m" in out.stderr and "Traceback" not in out.output


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--straddle-tokens", "-5"], "--straddle-tokens"),
        (["--concurrency", "0"], "--concurrency"),
        (["--chunk-tokens", "0"], "--chunk-tokens"),
        (["--chart", "{missing}/chart.png"], "--chart"),
        (["--json", "{folder}"], "--json"),
    ],
)
def test_eval_refuses_bad_numbers_and_unwritable_outputs_before_running(flags, words, tmp_path):
    flags = [f.format(missing=tmp_path / "nowhere", folder=tmp_path) for f in flags]

    out = eval_cli("--sizes", "4k", *flags)

    assert out.exit_code == 2, out.output
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "|" not in out.stdout, "no evaluation ran"


def test_missing_or_bad_schema_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "array"}')
    base = ["run", "-", "-q", "Which logins?", "--model", "scripted/m", "--store", "memory"]

    missing = CliRunner().invoke(main, [*base, "--schema", str(tmp_path / "none.json")], input=LOGINS)
    wrong = CliRunner().invoke(main, [*base, "--schema", str(bad)], input=LOGINS)

    assert missing.exit_code == 2 and missing.stderr.startswith("error: --schema")
    assert len(missing.stderr.strip().splitlines()) == 1
    assert wrong.exit_code == 2 and "'schema'" in wrong.stderr and "answer_schema" not in wrong.stderr
    assert not wrong.stderr.rstrip().endswith("}..") and wrong.stderr.rstrip().endswith(".")
