"""The LangChain integration: a tool for agents, a runnable, a chat model.

Run from the repository root: ``.venv/bin/python examples/langchain_tool_and_chat.py``.
Models come from ``RLM_GRAPH_*`` variables (default: the embedded model).

To give the tool to an agent, pass it with your own tool-calling model:
``langchain.agents.create_agent(model, [tool])``. Here the tool is called the
way an agent calls it, with a tool call, so the script runs without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.runnables import RunnableLambda
from langchain_rlm_graph import (
    PROGRESS_EVENT,
    ChatRlmGraph,
    RlmGraphRunnable,
    RlmGraphTool,
)

HERE = Path(__file__).parent
QUESTION = "What were the names of the three sisters in the Dormouse's story?"


class PrintProgress(BaseCallbackHandler):
    """Shows a run's progress events as they arrive."""

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == PROGRESS_EVENT and data["kind"] == "task_done":
            print(f"  task {data['task_id']} {data['status']}")


def main() -> None:
    tool = RlmGraphTool(root_dir=HERE, filter="sisters")
    message = tool.invoke(
        {
            "type": "tool_call",
            "id": "call-1",
            "name": tool.name,
            "args": {"question": QUESTION, "paths": ["alice_in_wonderland.txt"]},
        }
    )
    answer = message.content.split("\n\nSources:")[0]
    print("tool:", answer, f"({len(message.artifact.citations)} citations)")

    chain = RlmGraphRunnable(filter="sisters") | RunnableLambda(
        lambda result: result.answer
    )
    print(
        "chain:",
        chain.invoke(
            {"question": QUESTION, "paths": [str(HERE / "alice_in_wonderland.txt")]}
        ),
    )

    llm = ChatRlmGraph(settings={"filter": "sisters"}, with_citations=False)
    book = (HERE / "alice_in_wonderland.txt").read_text(encoding="utf-8")
    reply = llm.invoke(
        [SystemMessage(book), HumanMessage(QUESTION)], {"callbacks": [PrintProgress()]}
    )
    print("chat model:", reply.content, reply.usage_metadata)


if __name__ == "__main__":
    main()
