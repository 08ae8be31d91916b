"""rlm-graph as a node of a parent LangGraph graph, on the real Postgres checkpointer.

The parent has its own state (``query``, ``document``, ``findings``, ``report``)
and maps it into rlm-graph and back with :func:`rlm_node`. Inner model calls go
to the repo's ScriptedModel double (answering by regex, as a perfect reader).
Postgres is the server on 127.0.0.1:5432, database ``test``; each test uses a
fresh schema named after this branch and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, TypedDict

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph_rlm_graph import build_rlm_graph, rlm_node

from rlm_graph.testing import ModelRequest, Reply

from ..conftest import numbered_paragraphs, text_reply

SETTINGS = {
    "model": "scripted/m",
    "context_window": 4096,
    "chunk_tokens": 200,
    "concurrency": 1,
}
NEEDLE = "The secret code word is HELIOTROPE."
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


class Parent(TypedDict, total=False):
    query: str
    document: str
    findings: str | None
    report: str


def build_parent(checkpointer: Any, store: str | None = None) -> Any:
    builder = StateGraph(Parent)
    builder.add_node(
        "research",
        rlm_node(
            store=store,
            question=lambda s: s["query"],
            text=lambda s: s["document"],
            output=lambda result: {"findings": result.answer},
            **SETTINGS,
        ),
    )
    builder.add_node("write_report", lambda s: {"report": f"Findings: {s['findings']}"})
    builder.add_edge(START, "research")
    builder.add_edge("research", "write_report")
    builder.add_edge("write_report", END)
    return builder.compile(checkpointer=checkpointer)


@pytest.fixture
async def postgres_saver():
    pytest.importorskip("langgraph.checkpoint.postgres")
    import psycopg
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    schema = f"integrations_{uuid.uuid4().hex[:10]}"
    try:
        admin = await psycopg.AsyncConnection.connect(POSTGRES, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is needed for this test: {exc}")
    await admin.execute(f"CREATE SCHEMA {schema}")
    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    try:
        async with AsyncPostgresSaver.from_conn_string(url) as saver:
            await saver.setup()
            yield saver, admin, schema
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


def slow(responder: Any, latency_s: float) -> Any:
    def respond(request: ModelRequest) -> Reply:
        reply = responder(request)
        return Reply(
            content=reply if isinstance(reply, str) else reply.content,
            latency_s=latency_s,
        )

    return respond


@pytest.mark.postgres
async def test_subgraph_stores_its_checkpoints_in_the_parents_postgres_thread(
    scripted, postgres_saver
):
    saver, admin, schema = postgres_saver
    scripted(text_reply(r"The secret code word is (\w+)\."))
    parent = build_parent(saver)
    config = {"configurable": {"thread_id": "parent-1"}}
    document = numbered_paragraphs(40, needle_at={27: NEEDLE})

    state = await parent.ainvoke(
        {"query": "What is the secret code word?", "document": document}, config
    )

    assert state["report"] == "Findings: HELIOTROPE"
    rows = await admin.execute(
        f"SELECT DISTINCT checkpoint_ns FROM {schema}.checkpoints WHERE thread_id = 'parent-1'"
    )
    namespaces = {row[0] for row in await rows.fetchall()}
    assert "" in namespaces
    assert any(ns.startswith("research:") for ns in namespaces), namespaces


@pytest.mark.postgres
async def test_interrupted_parent_resumes_inside_the_subgraph_without_repeating_calls(
    tmp_path, scripted, postgres_saver
):
    saver, _, _ = postgres_saver
    document = numbered_paragraphs(40, needle_at={27: NEEDLE})
    question = {"query": "What is the secret code word?", "document": document}
    double = scripted(slow(text_reply(r"The secret code word is (\w+)\."), 0.02))

    # The whole run uses a store of its own, so its call log answers nothing below.
    full = await build_parent(InMemorySaver(), str(tmp_path / "whole.sqlite")).ainvoke(
        question, {"configurable": {"thread_id": "whole"}}
    )
    total = len(double.requests)
    double.reset()

    parent = build_parent(saver)
    config = {"configurable": {"thread_id": "parent-2"}}
    first = asyncio.create_task(parent.ainvoke(question, config))
    while len(double.requests) < total // 2:
        await asyncio.sleep(0.005)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    sent_before = len(double.requests)
    double.reset()

    snapshot = await parent.aget_state(config)
    assert snapshot.next == ("research",), "the parent stopped inside the research node"
    state = await parent.ainvoke(None, config)

    assert state["report"] == full["report"] == "Findings: HELIOTROPE"
    sent_after = len(double.requests)
    # concurrency is 1: at most one call was in flight when the run was cut.
    assert sent_after <= total - sent_before + 1, (total, sent_before, sent_after)
    assert sent_after < total
    print(
        f"calls: whole run {total}, before the cut {sent_before}, after resume {sent_after}"
    )


async def test_ready_graph_takes_text_or_paths_and_returns_the_result(
    scripted, tmp_path
):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    path = tmp_path / "book.txt"
    path.write_text(numbered_paragraphs(30, needle_at={12: NEEDLE}), encoding="utf-8")
    graph = build_rlm_graph(**SETTINGS)

    by_path = await graph.ainvoke(
        {"question": "What is the secret code word?", "paths": [str(path)]}
    )
    by_text = await graph.ainvoke(
        {"question": "What is the secret code word?", "text": path.read_text()}
    )

    assert by_path["answer"] == by_text["answer"] == "HELIOTROPE"
    assert by_path["result"]["citations"][0]["source"] == str(path)
    with pytest.raises(ValueError, match="exactly one of them"):
        await graph.ainvoke({"question": "Q?"})


def test_rlm_node_needs_exactly_one_source_mapping():
    with pytest.raises(ValueError, match="exactly one of paths= and text="):
        rlm_node(question=lambda s: s["q"])


def test_blocking_invoke_of_the_parent_says_to_use_ainvoke(scripted):
    scripted(text_reply(r"(x)"))
    parent = build_parent(InMemorySaver())

    with pytest.raises(RuntimeError, match="ainvoke"):
        parent.invoke(
            {"query": "Q?", "document": "a\n\nb"},
            {"configurable": {"thread_id": "sync"}},
        )


async def _cli(*args: str) -> Any:
    """The CLI, in-process, in a thread: it runs an event loop of its own."""
    from click.testing import CliRunner

    from rlm_graph.cli import main

    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_rlm_node_runs_are_listed_in_the_run_registry(scripted, tmp_path):
    import json

    scripted(text_reply(r"The secret code word is (\w+)\."))
    store = str(tmp_path / "runs.sqlite")
    parent = build_parent(InMemorySaver(), store)
    document = numbered_paragraphs(40, needle_at={27: NEEDLE})

    await parent.ainvoke(
        {"query": "What is the secret code word?", "document": document},
        {"configurable": {"thread_id": "listed"}},
    )

    listing = await _cli("runs", "--store", store, "--json")
    assert listing.exit_code == 0, listing.output
    rows = json.loads(listing.output)
    assert [(r["status"], r["question"]) for r in rows] == [
        ("done", "What is the secret code word?")
    ]
    assert rows[0]["run_id"].startswith("research-")
    shown = await _cli("show", rows[0]["run_id"], "--store", store)
    assert shown.exit_code == 0, shown.output
    assert "HELIOTROPE" in shown.output
    assert "inside LangGraph thread 'listed'" in shown.output


async def test_interrupted_rlm_node_run_shows_interrupted_and_resumes_as_the_same_run(
    scripted, tmp_path
):
    from rlm_graph.store import open_store

    store = str(tmp_path / "runs.sqlite")
    double = scripted(slow(text_reply(r"The secret code word is (\w+)\."), 0.02))
    parent = build_parent(InMemorySaver(), store)
    config = {"configurable": {"thread_id": "cut"}}
    document = numbered_paragraphs(40, needle_at={27: NEEDLE})

    first = asyncio.create_task(
        parent.ainvoke(
            {"query": "What is the secret code word?", "document": document}, config
        )
    )
    while len(double.requests) < 6:
        await asyncio.sleep(0.005)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    async with open_store(store) as opened:
        [cut] = await opened.list_runs()
    refused = await _cli("resume", cut.run_id, "--store", store)

    state = await parent.ainvoke(None, config)

    assert cut.status == "interrupted"
    assert cut.parent == {"thread_id": "cut", "namespace": cut.parent["namespace"]}
    assert cut.parent["namespace"].startswith("research:")
    assert refused.exit_code == 2
    assert "resume that graph instead" in refused.output
    assert state["report"] == "Findings: HELIOTROPE"
    async with open_store(store) as opened:
        [done] = await opened.list_runs()
    assert (done.run_id, done.status) == (cut.run_id, "done")
    assert done.result is not None and done.result["answer"] == "HELIOTROPE"
