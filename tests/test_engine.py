"""Whole runs through the graph with the scripted model double."""

from __future__ import annotations

import json
import re
import time

import pytest

from rlm_graph import RunConfig, arun
from rlm_graph.api import prepare
from rlm_graph.graph import build_graph, outcome_of
from rlm_graph.testing import ModelRequest, Reply

from .conftest import count_reply, excerpt_of, list_reply, numbered_paragraphs, text_reply

SETTINGS = {"model": "scripted/m", "context_window": 4096, "chunk_tokens": 200, "overlap_tokens": 16}


async def test_needle_answer_is_cited_at_its_exact_offsets(scripted):
    text = numbered_paragraphs(80, needle_at={57: "The secret code word is HELIOTROPE."})
    scripted(text_reply(r"The secret code word is (\w+)\."))

    result = await arun("What is the secret code word?", text=text, **SETTINGS)

    assert result.status == "done"
    assert result.answer == "HELIOTROPE"
    assert len(result.citations) == 1
    citation = result.citations[0]
    assert text[citation.start : citation.end] == citation.quote == "The secret code word is HELIOTROPE."
    assert citation.line == text[: citation.start].count("\n") + 1
    assert result.tree is not None and len(result.tree.children) > 1


async def test_source_text_never_enters_graph_state(scripted):
    text = numbered_paragraphs(60, needle_at={30: "The secret code word is ZEBRA."})
    scripted(text_reply(r"The secret code word is (\w+)\."))
    engine = prepare("What is the secret code word?", text=text, **SETTINGS)
    from langgraph.checkpoint.memory import InMemorySaver

    saver = InMemorySaver()
    graph = build_graph(engine, checkpointer=saver)
    config = {"configurable": {"thread_id": "t"}}
    await graph.ainvoke({"question": engine.plan.question}, config)

    state = dict((await graph.aget_state(config)).values)
    packed = state.pop("outcome")
    assert isinstance(packed, bytes)
    assert not state.get("outcomes"), "the children's copy is dropped once merged"
    unpacked = outcome_of({"outcome": packed}).model_dump_json()
    everything = json.dumps(state) + unpacked
    assert "Paragraph 12." not in everything
    tasks = everything.count('"depth"')
    assert len(everything) < 1000 * tasks, "state grows with tasks, not with text"
    assert len(packed) < len(unpacked) / 2, "outcomes are stored compressed"


async def test_graph_draws_the_five_stages(scripted):
    scripted(text_reply(r"(x)"))
    engine = prepare("What?", text="some text here", **SETTINGS)
    nodes = set(build_graph(engine).get_graph().nodes)
    assert {"plan", "split", "delegate", "verify", "merge"} <= nodes


async def test_list_answers_merge_by_code_without_overlap_duplicates(scripted):
    names = ["Ada", "Brook", "Cyrus", "Delia", "Ezra", "Fern", "Gus"]
    needles = {i * 9 + 3: f"The visitor named {name} arrived." for i, name in enumerate(names)}
    text = numbered_paragraphs(70, needle_at=needles)
    double = scripted(list_reply(r"The visitor named (\w+) arrived\."))

    result = await arun("List every visitor named in the text.", text=text, **SETTINGS)

    assert result.kind == "list"
    assert result.answer == names
    assert len(double.requests) > 5
    assert not any(r.prompt.startswith("Different parts") for r in double.requests)


async def test_count_is_exact_even_when_spans_overlap(scripted):
    # Needles close to paragraph ends land in overlaps and are seen twice.
    needles = {i: "A bell rang." for i in range(0, 90, 4)}
    text = numbered_paragraphs(90, needle_at=needles)
    scripted(count_reply(r"A bell rang\."))

    result = await arun("How many times did a bell ring?", text=text, **{**SETTINGS, "overlap_tokens": 40})

    assert result.kind == "count"
    assert result.answer == len(needles) == text.count("A bell rang.")


async def test_free_text_is_merged_by_the_root_model_in_bounded_groups(scripted):
    needles = {i: f"Fact {i}: the lamp is lit." for i in range(0, 80, 5)}
    text = numbered_paragraphs(80, needle_at=needles)
    double = scripted(text_reply(r"Fact (\d+): the lamp is lit\."))

    result = await arun("Which facts mention the lamp?", text=text, **{**SETTINGS, "fan_in": 3, "kind": "text"})

    merges = [r for r in double.requests if "partial answers" in r.prompt]
    assert merges, "several relevant pieces must be merged by a model call"
    assert all(len(re.findall(r"^\[\d+\]", r.prompt, re.M)) <= 3 for r in merges)
    for index in needles:
        assert str(index) in result.answer
    assert len(result.citations) == len(needles)


async def test_unsupported_quote_is_asked_again_with_the_reason(scripted):
    text = numbered_paragraphs(3, needle_at={1: "The key is under the blue stone."})
    attempts: list[str] = []

    def respond(request: ModelRequest) -> str:
        attempts.append(request.prompt)
        if "was rejected" not in request.prompt:
            return json.dumps({"relevant": True, "quote": "the key is in a drawer", "answer": "a drawer"})
        return json.dumps({"relevant": True, "quote": "The key is under the blue stone.", "answer": "under the blue stone"})

    scripted(respond)
    result = await arun("Where is the key?", text=text, **{**SETTINGS, "chunk_tokens": 2000})

    assert result.answer == "under the blue stone"
    assert len(attempts) == 2
    assert "does not occur in the excerpt" in attempts[1]
    assert result.tree is not None and result.tree.attempts == 2


async def test_truncated_reply_is_retried_with_more_room_not_merged_as_empty(scripted):
    # K08: an empty or cut-off reply with finish_reason=length is not "nothing found".
    people = {2: "The person named Orla waved.", 9: "The person named Pim waved.", 15: "The person named Quill waved."}
    text = numbered_paragraphs(20, needle_at=people)
    budgets: list[int | None] = []

    def respond(request: ModelRequest) -> Reply | str:
        excerpt = excerpt_of(request) or ""
        if "Pim" in excerpt and (request.max_tokens or 0) < 600:
            budgets.append(request.max_tokens)
            return Reply(content='{"items": [{"item": "Pi', finish_reason="length")
        return list_reply(r"The person named (\w+) waved\.")(request)

    scripted(respond)
    result = await arun("List every person named in the text.", text=text, **{**SETTINGS, "max_output_tokens": 300})

    assert "Pim" in result.answer
    assert result.status == "done"
    assert budgets and budgets[0] == 300


async def test_context_window_error_splits_finer_instead_of_resending(scripted):
    # K05: a context error in any wording is answered by splitting, never by
    # sending the same oversize prompt again.
    text = numbered_paragraphs(12, needle_at={7: "The secret code word is OPAL."})
    limit = 260

    def respond(request: ModelRequest) -> Reply | str:
        if request.prompt_tokens > limit:
            return Reply(error="bad_request", error_message=(
                f"The input ({request.prompt_tokens} tokens) is longer than the model's context length ({limit} tokens)."
            ))
        return text_reply(r"The secret code word is (\w+)\.")(request)

    double = scripted(respond)
    result = await arun("What is the secret code word?", text=text, **{**SETTINGS, "chunk_tokens": 400})

    assert result.answer == "OPAL"
    oversize = [r for r in double.requests if r.prompt_tokens > limit]
    assert len({r.prompt for r in oversize}) == len(oversize), "an oversize prompt was sent twice"
    assert max(r.prompt_tokens for r in double.requests if r.prompt_tokens <= limit) <= limit


async def test_failed_piece_is_reported_and_the_others_keep_their_own_answers(scripted):
    # K09: answers are keyed by span, never by position in a list.
    words = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO"]
    text = "\n\n".join(
        f"Chapter {i + 1}.\n" + numbered_paragraphs(4, needle_at={2: f"The code word is {w}."})
        for i, w in enumerate(words)
    )

    def respond(request: ModelRequest) -> Reply | str:
        if "DELTA" in (excerpt_of(request) or ""):
            return Reply(error="bad_request", error_message="unsupported content in request")
        return list_reply(r"The code word is (\w+)\.")(request)

    scripted(respond)
    result = await arun("List every code word.", text=text, **SETTINGS)

    assert result.status == "partial"
    assert result.answer == ["ALPHA", "BRAVO", "CHARLIE", "ECHO"]
    assert result.failures and all(
        "DELTA" in text[f.start : f.end] for f in result.failures
    )


async def test_refusal_is_not_merged_as_an_answer(scripted):
    # K20: a refusal is retried; quoted refusal-like dialogue is a real answer.
    text = numbered_paragraphs(10, needle_at={
        2: '"I cannot do that," the guard said.',
        7: "The secret code word is AMBER.",
    })

    def respond(request: ModelRequest) -> Reply | str:
        excerpt = excerpt_of(request) or ""
        if "AMBER" in excerpt and "was rejected" not in request.prompt:
            return Reply(content="", refusal="I'm sorry, I can't help with that.")
        return text_reply(r"The secret code word is (\w+)\.")(request)

    scripted(respond)
    result = await arun("What is the secret code word?", text=text, **SETTINGS)

    assert result.answer == "AMBER"
    assert "sorry" not in result.answer.lower()


async def test_concurrency_limit_bounds_calls_in_flight(scripted):
    # K13: the limit holds, and a limit of 1 still answers every piece.
    needles = {i: "A bell rang." for i in range(0, 40, 3)}
    text = numbered_paragraphs(40, needle_at=needles)
    for limit in (1, 3):
        double = scripted(lambda r: Reply(content=count_reply(r"A bell rang\.")(r), latency_s=0.02))
        result = await arun("How many times did a bell ring?", text=text, **{**SETTINGS, "concurrency": limit, "overlap_tokens": 0})
        assert double.max_in_flight <= limit
        assert result.answer == len(needles)
        double.unregister()


async def test_unknown_setting_is_refused_not_ignored():
    from rlm_graph import ConfigError

    with pytest.raises(ConfigError, match="max_concurency"):
        await arun("q", text="some text", max_concurency=4)


async def test_fast_subtree_merges_before_slow_sibling_finishes(scripted):
    fast = numbered_paragraphs(30, needle_at={5: "The secret code word is QUICK."})
    slow = numbered_paragraphs(30).replace("river", "SLOWRIVER")
    text = fast + "\n\n\n" + slow
    timeline: list[tuple[float, str, str]] = []

    def respond(request: ModelRequest) -> Reply | str:
        excerpt = excerpt_of(request) or ""
        reply = text_reply(r"The secret code word is (\w+)\.")(request)
        return Reply(content=reply, latency_s=1.5 if "SLOWRIVER" in excerpt else 0.01)

    scripted(respond)

    def on_event(event):
        timeline.append((time.monotonic(), event.kind, event.task_id))

    result = await arun(
        "What is the secret code word?", text=text, on_event=on_event,
        **{**SETTINGS, "fan_out": 2, "max_depth": 8, "concurrency": 64, "overlap_tokens": 0},
    )
    assert result.answer == "QUICK"
    done = {task: t for t, kind, task in timeline if kind == "task_done"}
    first_children = sorted(t for t in done if t.count(".") == 1)
    assert len(first_children) == 2
    fast_done, slow_done = done[first_children[0]], done[first_children[1]]
    assert fast_done < slow_done - 0.25
    merges = [task for _, kind, task in timeline if kind == "task_done"]
    assert len(merges) == len(set(merges)), "a task finished (merged) twice"
