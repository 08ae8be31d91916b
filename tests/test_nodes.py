"""Stage functions one at a time: plan, verify and merge."""

from __future__ import annotations

import json

import pytest

from rlm_graph import ConfigError, RunConfig
from rlm_graph.models import Completion
from rlm_graph.nodes.merge import dedupe_text, merge_count, merge_list
from rlm_graph.nodes.plan import guess_kind, make_plan
from rlm_graph.nodes.types import Answer, Evidence, Item, Task
from rlm_graph.nodes.verify import locate_quote, verify_leaf
from rlm_graph.source import source_from_text

TEXT = "Alice met the Hatter.  The   Hatter said:\n`It is always six o'clock now.'\nThe end."


def completion(content: str, finish_reason: str = "stop", refusal: str | None = None) -> Completion:
    return Completion(text=content, finish_reason=finish_reason, prompt_tokens=10, completion_tokens=5, refusal=refusal)


def task(start: int = 0, end: int = len(TEXT), question: str = "What time is it?") -> Task:
    return Task(id="0.1", start=start, end=end, depth=1, question=question, tokens=40)


@pytest.mark.parametrize(
    ("question", "kind"),
    [("How many bells rang?", "count"), ("List every city visited.", "list"), ("Who is the Hatter?", "text")],
)
def test_plan_guesses_kind_from_wording(question, kind):
    assert guess_kind(question) == kind


def test_plan_refuses_a_window_too_small_for_the_instructions():
    # K18(b): fail fast at planning, never a zero or negative span budget.
    source = source_from_text("x " * 100)
    config = RunConfig(model="scripted/m", max_output_tokens=1900)
    with pytest.raises(ConfigError, match="window .* too small"):
        make_plan("What?", source, config, count=len, window=2048)


def test_plan_budget_leaves_room_for_prompt_and_output():
    source = source_from_text("word " * 5000)
    plan = make_plan("What?", source, RunConfig(model="scripted/m", max_output_tokens=500), count=len, window=4096)
    assert plan.leaf_tokens + plan.output_tokens < plan.window


def test_quote_is_found_exactly_or_despite_whitespace_case_and_quote_marks():
    exact = locate_quote(TEXT, 0, len(TEXT), "Alice met the Hatter.")
    assert exact is not None and TEXT[exact.start : exact.end] == "Alice met the Hatter."
    loose = locate_quote(TEXT, 0, len(TEXT), "the hatter SAID: 'it is always six o'clock now.'")
    assert loose is not None and TEXT[loose.start : loose.end].startswith("The   Hatter said:")
    assert locate_quote(TEXT, 0, 10, "The end.") is None, "outside the span is not evidence"
    assert locate_quote(TEXT, 0, len(TEXT), "Alice") is None, "too short to be evidence"


def test_verify_accepts_supported_answer_and_turns_quote_into_evidence():
    reply = json.dumps({"answer": "six o'clock", "quote": "It is always six o'clock now."})
    verdict = verify_leaf(TEXT, task(), "text", completion(reply))
    assert verdict.ok and verdict.answer is not None
    evidence = verdict.answer.evidence[0]
    assert TEXT[evidence.start : evidence.end] == "It is always six o'clock now."


def test_verify_rejects_a_quote_that_is_not_in_the_span_however_right_the_answer():
    reply = json.dumps({"answer": "six o'clock", "quote": "the clock always shows six"})
    verdict = verify_leaf(TEXT, task(), "text", completion(reply))
    assert not verdict.ok and verdict.code == "no-evidence"


def test_verify_locates_the_sentence_when_no_quote_is_given():
    reply = json.dumps({"answer": "six o'clock", "quote": ""})
    verdict = verify_leaf(TEXT, task(), "text", completion(reply))
    assert verdict.ok
    assert "six o'clock" in verdict.answer.evidence[0].quote


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (completion('{"answer": "six', finish_reason="length"), "truncated"),
        (completion("", finish_reason="length"), "truncated"),
        (completion(""), "empty"),
        (completion("", refusal="I can't help with that."), "refused"),
        (completion("I'm sorry, I cannot summarise this."), "refused"),
        (completion("six o'clock, I think"), "malformed"),
        (completion(json.dumps({"answer": "midnight", "quote": "Alice met the Hatter."})), "no-evidence"),
    ],
    ids=["cut-json", "cut-empty", "empty", "refusal-field", "refusal-text", "not-json", "unsupported"],
)
def test_verify_rejects_what_cannot_be_used(reply, code):
    verdict = verify_leaf(TEXT, task(), "text", reply)
    assert not verdict.ok and verdict.code == code and verdict.feedback


def test_an_answer_that_only_restates_the_question_is_rejected():
    reply = json.dumps({"answer": "It is always the time at the tea-party.", "quote": "Alice met the Hatter."})
    verdict = verify_leaf(TEXT, task(question="What time is it always at the tea-party?"), "text", completion(reply))
    assert not verdict.ok and verdict.code == "restated"
    short = json.dumps({"answer": "6", "quote": "six o'clock"})
    assert verify_leaf(TEXT, task(), "text", completion(short)).code != "restated"


def test_not_stated_is_a_real_answer_of_nothing_found():
    verdict = verify_leaf(TEXT, task(), "text", completion(json.dumps({"answer": "not stated", "quote": ""})))
    assert verdict.ok and verdict.answer is not None and not verdict.answer.found


def test_refusal_like_text_in_the_source_is_not_a_refusal():
    source = '"I cannot do that," the guard said. The gate stayed shut.'
    reply = json.dumps({"answer": "I cannot do that", "quote": '"I cannot do that," the guard said.'})
    verdict = verify_leaf(source, task(0, len(source), "What did the guard say?"), "text", completion(reply))
    assert verdict.ok


def _evidence(start: int, end: int) -> Evidence:
    return Evidence(quote="q", start=start, end=end)


def test_list_merge_keeps_order_and_drops_overlap_duplicates():
    first = Answer(kind="list", found=True, items=(Item(text="Lisbon", evidence=_evidence(10, 16)), Item(text="Oslo", evidence=_evidence(90, 94))))
    second = Answer(kind="list", found=True, items=(Item(text="oslo", evidence=_evidence(90, 94)), Item(text="Quito", evidence=_evidence(150, 155))))
    merged = merge_list([first, second])
    assert [i.text for i in merged.items] == ["Lisbon", "Oslo", "Quito"]


def test_count_merge_subtracts_occurrences_both_overlapping_spans_saw():
    left = Answer(kind="count", found=True, count=3, evidence=(_evidence(0, 5), _evidence(20, 25), _evidence(95, 100)))
    right = Answer(kind="count", found=True, count=2, evidence=(_evidence(95, 100), _evidence(130, 135)))
    assert merge_count([left, right]).count == 4


def test_text_answers_seen_twice_in_an_overlap_are_kept_once():
    a = Answer(kind="text", found=True, text="HELIOTROPE", evidence=(_evidence(40, 60),))
    b = Answer(kind="text", found=True, text="heliotrope.", evidence=(_evidence(40, 60),))
    c = Answer(kind="text", found=True, text="ZEBRA", evidence=(_evidence(200, 210),))
    assert [x.text for x in dedupe_text([a, b, c])] == ["HELIOTROPE", "ZEBRA"]


def test_task_rejects_a_bad_span_before_it_is_stored():
    # K15: a schema violation is refused with the field named.
    with pytest.raises(ValueError, match="start"):
        Task(id="0.1", start=-1, end=5, depth=1, question="q", tokens=1)
    with pytest.raises(ValueError, match="before its start"):
        Task(id="0.1", start=9, end=5, depth=1, question="q", tokens=1)


def test_file_headers_of_the_joined_text_are_never_evidence():
    # Found by a user test: a quote of our own "=== file: ... ===" line was cited.
    from rlm_graph.source import source_from_text

    source = source_from_text("Hello world. The code is X.\n")
    header = source.text[: source.files[0].start].strip()
    assert locate_quote(source.text, 0, len(source.text), header) is None
    assert locate_quote(source.text, 0, len(source.text), "The code is X.") is not None


def test_same_file_named_twice_is_read_once(tmp_path, monkeypatch):
    from rlm_graph.source import load_source

    (tmp_path / "a.txt").write_text("alpha\n")
    monkeypatch.chdir(tmp_path)
    assert len(load_source(["a.txt", "./a.txt", str(tmp_path / "a.txt")]).files) == 1
    assert len(load_source("a.txt").files) == 1, "a single path string is one path"


def test_dedupe_keeps_a_merged_answer_that_shares_only_some_evidence():
    # Two sibling subtrees overlap by one span: both cite fact 35, but the second
    # also carries facts 40-50 that nothing else cites; it must not be dropped.
    fact_35 = Evidence(quote="Fact 35", start=100, end=107)
    first = Answer(kind="text", found=True, text="15; 35", evidence=(Evidence(quote="Fact 15", start=10, end=17), fact_35))
    second = Answer(kind="text", found=True, text="35; 40", evidence=(fact_35, Evidence(quote="Fact 40", start=200, end=207)))
    only_repeat = Answer(kind="text", found=True, text="thirty-five", evidence=(fact_35,))
    assert [a.text for a in dedupe_text([first, second, only_repeat])] == ["15; 35", "35; 40"]
