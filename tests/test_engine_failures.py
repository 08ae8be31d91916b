"""How the engine answers a reply it cannot use, and a budget stop, end to end."""

from __future__ import annotations

import json

from rlm_graph import arun
from rlm_graph.api import aresume
from rlm_graph.testing import ModelRequest, Reply

from .conftest import excerpt_of, list_reply, numbered_paragraphs

SETTINGS = {
    "model": "scripted/m", "context_window": 4096, "chunk_tokens": 200,
    "overlap_tokens": 16,
}
QUESTION = "List every visitor named in the text."
VISITOR = r"The visitor named (\w+) arrived\."


async def test_reply_cut_off_at_the_ceiling_is_split_finer_not_asked_again(scripted):
    text = numbered_paragraphs(6, needle_at={1: "The visitor named Ada arrived."})
    clean = list_reply(VISITOR)

    def respond(request: ModelRequest) -> Reply | str:
        if len(excerpt_of(request) or "") > 600:
            return Reply(content='{"items": [{"item": "A', finish_reason="length")
        return clean(request)

    double = scripted(respond)
    result = await arun(QUESTION, text=text, max_output_tokens=64, **SETTINGS)

    assert result.answer == ["Ada"] and result.status == "done"
    cut = [r for r in double.requests if len(excerpt_of(r) or "") > 600]
    # Once with the normal room, then with more room up to the ceiling;
    # never the same prompt with the same room again.
    rooms = [(r.prompt, r.max_tokens) for r in cut]
    assert len(rooms) == len(set(rooms))
    assert not any("previous reply was rejected" in r.prompt for r in cut), (
        "a re-ask with the same room would be cut off again"
    )
    assert any(len(excerpt_of(r) or "") <= 600 for r in double.requests), "split finer"


async def test_empty_reply_gets_one_corrective_re_ask(scripted):
    text = numbered_paragraphs(2, needle_at={1: "The visitor named Ada arrived."})
    clean = list_reply(VISITOR)
    seen: list[str] = []

    def respond(request: ModelRequest) -> Reply | str:
        seen.append(request.prompt)
        return Reply(content="") if len(seen) == 1 else clean(request)

    double = scripted(respond)
    result = await arun(QUESTION, text=text, **SETTINGS)

    assert result.answer == ["Ada"]
    assert len(double.requests) == 2
    assert "previous reply was rejected" in double.requests[1].prompt


async def test_budget_stopped_run_resumes_to_the_full_answer_without_paying_twice(
    scripted, tmp_path
):
    names = ["Ada", "Brook", "Cyrus", "Delia", "Ezra"]
    needles = {i * 9 + 2: f"The visitor named {n} arrived." for i, n in enumerate(names)}
    text_path = tmp_path / "book.txt"
    text_path.write_text(numbered_paragraphs(45, needle_at=needles))
    double = scripted(list_reply(VISITOR))
    store = str(tmp_path / "store.sqlite")

    from rlm_graph.api import execute, prepare
    from rlm_graph.store import open_store

    engine = prepare(QUESTION, [text_path], max_calls=4, concurrency=1, **SETTINGS)
    async with open_store(store) as opened:
        stopped = await execute(engine, store=opened)
    sent_before = len(double.requests)
    finished = await aresume(stopped.run_id, store=store, max_calls=100)

    assert stopped.status == "stopped" and sent_before == 4
    assert finished.status == "done" and finished.answer == names
    prompts = [r.prompt for r in double.requests]
    assert len(prompts) == len(set(prompts)), "no call that returned was sent again"
    assert json.loads(finished.model_dump_json())["stop_reason"] is None
