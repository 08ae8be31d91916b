"""rlm-graph as a node of your own LangGraph graph, with your own state.

Run from the repository root: ``.venv/bin/python examples/langgraph_subgraph.py``.
The parent graph keeps its checkpoints in a SQLite file; rlm-graph's stages
and model calls are stored in the same thread, so a run cut short resumes
inside the research node with ``await graph.ainvoke(None, config)``. rlm-graph's
stages are async: run the parent with ``ainvoke``/``astream``.
Models come from ``RLM_GRAPH_*`` variables (default: the embedded model).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import TypedDict

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph_rlm_graph import rlm_node

BOOK = Path(__file__).with_name("alice_in_wonderland.txt")


class Research(TypedDict, total=False):
    topic: str
    files: list[str]
    findings: str | None
    summary: str


def build(checkpointer: AsyncSqliteSaver):
    builder = StateGraph(Research)
    builder.add_node(
        "research",
        rlm_node(
            question=lambda s: f"What were the names of the {s['topic']}?",
            paths=lambda s: s["files"],
            output=lambda result: {"findings": result.answer},
            filter="sisters",
        ),
    )
    builder.add_node(
        "summarise", lambda s: {"summary": f"{s['topic']}: {s['findings']}"}
    )
    builder.add_edge(START, "research")
    builder.add_edge("research", "summarise")
    builder.add_edge("summarise", END)
    return builder.compile(checkpointer=checkpointer)


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with AsyncSqliteSaver.from_conn_string(
            str(Path(folder) / "checkpoints.db")
        ) as saver:
            graph = build(saver)
            config = {"configurable": {"thread_id": "alice-1"}}
            state = await graph.ainvoke(
                {
                    "topic": "three sisters in the Dormouse's story",
                    "files": [str(BOOK)],
                },
                config,
            )
            print(state["summary"])
            rows = await saver.conn.execute(
                "SELECT DISTINCT checkpoint_ns FROM checkpoints"
            )
            namespaces = sorted(row[0] for row in await rows.fetchall())
            print("checkpoint namespaces in the parent's thread:", namespaces)


if __name__ == "__main__":
    asyncio.run(main())
