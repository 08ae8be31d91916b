"""rlm-graph inside a user's own LangGraph graph, with a different state.

LangGraph adds a subgraph whose state differs from the parent's by calling it
from a node that maps the parent's state in and the result out. :func:`rlm_node`
makes that node. Each time it runs it loads the source, makes the plan and
invokes rlm-graph's compiled graph (plan → split → delegate → verify → merge)
compiled *without* a checkpointer, so LangGraph gives it the parent's: its
checkpoints and every finished model call (a durable task) are stored in the
parent's thread, under the node's namespace. When the parent is resumed after
an interruption (``graph.ainvoke(None, config)`` on the same thread), the
node runs again and the subgraph continues from its own last checkpoint;
model calls that had returned are not sent again.

Each run is also listed in the rlm-graph store's run registry (``rlm-graph
runs``, ``show``), under an id made of the node's name and a hash of the
parent's thread and the node's task, so that a resumed parent continues the
same run; its record names the parent's thread.

The mapping, in and out:

- in: ``question(state) -> str`` and one of ``paths(state) -> list of paths`` or
  ``text(state) -> str``;
- out: ``output(result) -> dict`` (a partial update of the parent's state); the
  default is ``{"answer": result.answer}``.

rlm-graph's stages are async, so the parent runs with ``ainvoke``/``astream``
and an async checkpointer (``AsyncSqliteSaver``, ``AsyncPostgresSaver``,
``InMemorySaver``); a blocking ``invoke`` gets an error saying so.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from rlm_graph import Result, RunConfig
from rlm_graph.api import execute_nested, prepare
from rlm_graph.store import open_store

__all__ = ["RlmState", "build_rlm_graph", "rlm_node"]

StateMap = Callable[[Any], Any]


class RlmState(TypedDict, total=False):
    """The state of :func:`build_rlm_graph`'s graph (what its server accepts)."""

    question: str
    """The question (input)."""
    paths: list[str] | None
    """Files or folders to read (input; or ``text``)."""
    text: str | None
    """A text to read (input; or ``paths``)."""
    answer: Any
    """The answer: text, a list of items or a count (output)."""
    result: dict[str, Any] | None
    """The whole :class:`rlm_graph.Result` as JSON data (output)."""


def rlm_node(
    *,
    question: StateMap,
    paths: StateMap | None = None,
    text: StateMap | None = None,
    output: Callable[[Result], dict[str, Any]] | None = None,
    config: RunConfig | None = None,
    store: str | None = None,
    **settings: Any,
) -> RunnableLambda[Any, dict[str, Any]]:
    """Make a node that asks rlm-graph from a parent graph's state.

    Args:
        question: reads the question from the parent's state.
        paths: reads files or folders to read from the parent's state.
        text: reads a text to read from the parent's state (instead of ``paths``).
        output: turns the :class:`~rlm_graph.Result` into the parent's state
            update; default ``{"answer": result.answer}``.
        config: settings of each run; ``settings`` override its fields.
        store: the rlm-graph store whose call log answers calls already made
            (SQLite file or PostgreSQL URL); None: ``$RLM_GRAPH_STORE``, else
            the per-user store. The parent's checkpointer keeps the stages and
            the root's children; deeper calls are replayed from this log.

    Returns:
        A node for ``StateGraph.add_node``; it runs under ``ainvoke``/``astream``.

    Raises:
        ValueError: neither or both of ``paths`` and ``text``.

    Example:
        >>> builder.add_node("research", rlm_node(  # doctest: +SKIP
        ...     question=lambda s: s["query"], paths=lambda s: s["files"],
        ...     output=lambda r: {"findings": r.answer}))
    """
    if (paths is None) == (text is None):
        msg = "rlm_node needs exactly one of paths= and text= to read the source from the state."
        raise ValueError(msg)
    to_update = output or (lambda result: {"answer": result.answer})
    run_config = config

    async def rlm(state: Any, config: RunnableConfig) -> dict[str, Any]:
        source_paths: Sequence[str] | None = list(paths(state)) if paths else None
        source_text = text(state) if text else None
        # Loading and counting a large source takes CPU time: off the loop, so
        # other nodes (and a server's other runs) go on meanwhile.
        engine = await asyncio.to_thread(
            prepare,
            question(state),
            source_paths,
            text=source_text,
            config=run_config,
            **settings,
        )
        run_id, parent = _run_identity(config)
        async with open_store(store) as opened:
            result = await execute_nested(
                engine, store=opened, run_id=run_id, parent=parent
            )
        return to_update(result)

    return RunnableLambda(_refuse_blocking, afunc=rlm, name="rlm")


def _run_identity(config: RunnableConfig) -> tuple[str | None, dict[str, str] | None]:
    """The run id of this node's run, the same each time LangGraph retries or
    resumes the task: a hash of the parent's thread and the node's checkpoint
    namespace (which holds the task id). None without a thread: a new run."""
    configurable = config.get("configurable") or {}
    thread = configurable.get("thread_id")
    namespace = str(configurable.get("checkpoint_ns") or "")
    if thread is None:
        return None, None
    node = namespace.rpartition("|")[2].partition(":")[0] or "rlm"
    digest = hashlib.sha256(f"{thread}\n{namespace}".encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", node).strip("-._")[:40] or "rlm"

    return f"{name}-{digest}", {"thread_id": str(thread), "namespace": namespace}


def _refuse_blocking(state: Any) -> dict[str, Any]:
    msg = (
        "rlm-graph's stages are async: run the parent graph with 'await graph.ainvoke(...)' "
        "or 'graph.astream(...)', with an async checkpointer (AsyncSqliteSaver, "
        "AsyncPostgresSaver or InMemorySaver)."
    )
    raise RuntimeError(msg)


def build_rlm_graph(
    config: RunConfig | None = None, **settings: Any
) -> CompiledStateGraph:
    """A one-node graph over :class:`RlmState`: question and source in, result out.

    Compiled without a checkpointer: used as a subgraph it shares its parent's;
    served by the LangGraph server, the server's own is used.
    """

    def _output(result: Result) -> dict[str, Any]:
        return {"answer": result.answer, "result": result.model_dump(mode="json")}

    node = rlm_node(
        question=lambda s: s["question"],
        text=lambda s: s.get("text") or None,
        output=_output,
        config=config,
        **settings,
    )
    paths_node = rlm_node(
        question=lambda s: s["question"],
        paths=lambda s: s.get("paths") or [],
        output=_output,
        config=config,
        **settings,
    )

    async def rlm(state: RlmState) -> dict[str, Any]:
        if bool(state.get("text")) == bool(state.get("paths")):
            msg = "Give the input 'question' and either 'paths' or 'text', exactly one of them."
            raise ValueError(msg)
        return await (node if state.get("text") else paths_node).ainvoke(state)

    builder = StateGraph(RlmState)
    builder.add_node("rlm", rlm)
    builder.add_edge(START, "rlm")
    builder.add_edge("rlm", END)

    return builder.compile(name="rlm-graph-subgraph")
