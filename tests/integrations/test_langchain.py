"""The LangChain adapters with the real LangChain: agent loop, LCEL, callbacks.

The inner runs' models are the repo's ScriptedModel double (a LiteLLM provider
that answers as a perfect reader would, by regex). The agent's own model is
``ToolCallingDouble``, a langchain-core ``BaseChatModel`` written here that
calls the tool once and then repeats what the tool returned: it stands in for
an LLM deciding to use the tool, so the test exercises LangChain's real agent
loop (``langchain.agents.create_agent``) and our tool inside it.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableLambda
from langchain_rlm_graph import (
    PROGRESS_EVENT,
    ChatRlmGraph,
    RlmGraphRunnable,
    RlmGraphTool,
)
from pydantic import Field

from rlm_graph import ConfigError, Result

from ..conftest import numbered_paragraphs, text_reply

SETTINGS = {"model": "scripted/m", "context_window": 4096, "chunk_tokens": 200}
NEEDLE = "The secret code word is HELIOTROPE."


class ToolCallingDouble(BaseChatModel):
    """Agent-model double: one tool call with fixed arguments, then echo the result."""

    tool_name: str
    tool_args: dict[str, Any]
    bound_tools: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "tool-calling-double"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingDouble:
        self.bound_tools = [getattr(t, "name", None) or t["name"] for t in tools]
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: Any = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        results = [m for m in messages if isinstance(m, ToolMessage)]
        if not results:
            call = {
                "name": self.tool_name,
                "args": self.tool_args,
                "id": "call-1",
                "type": "tool_call",
            }
            message = AIMessage(content="", tool_calls=[call])
        else:
            message = AIMessage(content=f"The tool said: {results[-1].content}")
        return ChatResult(generations=[ChatGeneration(message=message)])


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


class AsyncRecorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(numbered_paragraphs(40, needle_at={27: NEEDLE}), encoding="utf-8")
    return path


async def test_agent_loop_calls_the_tool_and_reads_its_cited_answer(scripted, book):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    tool = RlmGraphTool(root_dir=book.parent, **SETTINGS)
    agent_model = ToolCallingDouble(
        tool_name=tool.name,
        tool_args={"question": "What is the secret code word?", "paths": ["book.txt"]},
    )
    agent = create_agent(agent_model, [tool])

    state = await agent.ainvoke(
        {"messages": [HumanMessage("Find the code word in book.txt")]}
    )

    assert agent_model.bound_tools == ["ask_large_source"]
    tool_message = next(m for m in state["messages"] if isinstance(m, ToolMessage))
    assert tool_message.status == "success"
    assert tool_message.content.startswith("HELIOTROPE")
    assert NEEDLE in tool_message.content
    assert isinstance(tool_message.artifact, Result)
    assert tool_message.artifact.citations[0].source.endswith("book.txt")
    assert state["messages"][-1].content == f"The tool said: {tool_message.content}"
    assert len(double.requests) > 3, "the source was read in several leaf calls"


async def test_agent_gets_a_path_outside_root_back_as_a_tool_error(
    scripted, book, tmp_path
):
    double = scripted(text_reply(r"(x)"))
    tool = RlmGraphTool(root_dir=book.parent / "sub", **SETTINGS)
    agent_model = ToolCallingDouble(
        tool_name=tool.name, tool_args={"question": "Q?", "paths": ["../book.txt"]}
    )

    state = await create_agent(agent_model, [tool]).ainvoke(
        {"messages": [HumanMessage("go")]}
    )

    tool_message = next(m for m in state["messages"] if isinstance(m, ToolMessage))
    assert tool_message.status == "error"
    assert "outside the folder this tool may read" in tool_message.content
    assert double.requests == []


def test_tool_sync_call_validates_its_arguments(scripted):
    scripted(text_reply(r"(x)"))
    tool = RlmGraphTool(**SETTINGS)
    assert tool.args_schema.model_json_schema()["required"] == ["question"]

    message = tool.invoke({"question": "Q?"})  # neither paths nor text

    assert "exactly one of them" in message


def test_tool_sync_call_answers_over_text(scripted):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    tool = RlmGraphTool(**SETTINGS)
    text = numbered_paragraphs(30, needle_at={12: NEEDLE})

    content = tool.invoke({"question": "What is the secret code word?", "text": text})

    assert content.startswith("HELIOTROPE")


async def test_runnable_in_an_lcel_chain_reports_progress_as_custom_events(scripted):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    text = numbered_paragraphs(30, needle_at={12: NEEDLE})
    chain = RlmGraphRunnable(**SETTINGS) | RunnableLambda(
        lambda result: result.answer.lower()
    )
    recorder = AsyncRecorder()

    answer = await chain.ainvoke(
        {"question": "What is the secret code word?", "text": text},
        {"callbacks": [recorder]},
    )

    assert answer == "heliotrope"
    kinds = [data["kind"] for name, data in recorder.events if name == PROGRESS_EVENT]
    assert kinds.count("task_started") == kinds.count("task_done") > 1
    assert "call_done" in kinds


def test_runnable_sync_invoke_and_bad_input(scripted):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    text = numbered_paragraphs(30, needle_at={12: NEEDLE})
    runnable = RlmGraphRunnable(**SETTINGS)
    recorder = Recorder()

    result = runnable.invoke(
        {"question": "What is the secret code word?", "text": text},
        {"callbacks": [recorder]},
    )

    assert result.answer == "HELIOTROPE"
    assert any(data["kind"] == "call_done" for _, data in recorder.events)
    with pytest.raises(ConfigError, match="either 'paths' or 'text'"):
        runnable.invoke({"question": "What?"})


async def test_chat_model_answers_over_long_messages_with_usage_and_progress(scripted):
    double = scripted(text_reply(r"The secret code word is (\w+)\."))
    text = numbered_paragraphs(40, needle_at={27: NEEDLE})
    llm = ChatRlmGraph(
        **{
            "model": "scripted/m",
            "settings": {"context_window": 4096, "chunk_tokens": 200},
        }
    )

    events = [
        event
        async for event in llm.astream_events(
            [SystemMessage(text), HumanMessage("What is the secret code word?")],
            version="v2",
        )
    ]

    progress = [
        e
        for e in events
        if e["event"] == "on_custom_event" and e["name"] == PROGRESS_EVENT
    ]
    assert len(progress) > 3
    end = next(e for e in events if e["event"] == "on_chat_model_end")
    message = end["data"]["output"]
    assert message.content.startswith("HELIOTROPE")
    usage = message.usage_metadata
    assert usage["input_tokens"] == sum(r.prompt_tokens for r in double.requests)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert message.response_metadata["status"] == "done"
    assert message.response_metadata["citations"][0]["quote"] == NEEDLE


def test_chat_model_single_message_and_errors(scripted):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    text = numbered_paragraphs(30, needle_at={12: NEEDLE})
    llm = ChatRlmGraph(
        model="scripted/m",
        settings={"context_window": 4096, "chunk_tokens": 200},
        with_citations=False,
    )

    assert (
        llm.invoke(text + "\n\nWhat is the secret code word?").content == "HELIOTROPE"
    )
    with pytest.raises(ConfigError, match="Nothing to read besides the question"):
        llm.invoke("What is the secret code word?")
    with pytest.raises(NotImplementedError):
        llm.bind_tools([RlmGraphTool()])


def test_tool_returns_a_store_error_to_the_agent_instead_of_raising(scripted, tmp_path):
    double = scripted(text_reply(r"(x)"))
    not_a_store = tmp_path / "notes.sqlite"
    not_a_store.write_text("these are my notes, not a database\n", encoding="utf-8")
    tool = RlmGraphTool(store=str(not_a_store), **SETTINGS)

    message = tool.invoke({"question": "Q?", "text": "Some text to read."})

    assert "is not an rlm-graph store" in message
    assert double.requests == []
    assert not_a_store.read_text(encoding="utf-8") == "these are my notes, not a database\n"


async def test_a_store_given_among_the_settings_is_the_tools_store(scripted, book, tmp_path):
    scripted(text_reply(r"The secret code word is (\w+)\."))
    store = tmp_path / "runs.sqlite"
    tool = RlmGraphTool(root_dir=book.parent, settings={"store": str(store), **SETTINGS})
    assert tool.store == str(store)
    assert "store" not in tool.settings
    _, result = await tool._arun("What is the secret code word?", paths=["book.txt"])
    assert result.answer.startswith("HELIOTROPE")
    assert store.exists()


@pytest.mark.parametrize("key", ["run_id", "text"])
def test_a_per_call_argument_as_a_setting_is_refused_clearly(key):
    with pytest.raises(ValueError, match=f"{key} cannot be a setting of every call"):
        RlmGraphTool(**{key: "x"}, **SETTINGS)


def test_the_chat_model_and_the_runnable_take_a_store_from_their_settings(tmp_path):
    from langchain_rlm_graph import ChatRlmGraph, RlmGraphRunnable

    store = str(tmp_path / "runs.sqlite")
    chat = ChatRlmGraph(model_name="scripted/m", settings={"store": store, "context_window": 4096})
    runnable = RlmGraphRunnable(settings={"store": store}, **SETTINGS)
    assert chat.store == runnable.store == store
    assert chat.model == "scripted/m"
    assert "store" not in chat.settings and "store" not in runnable.settings
    with pytest.raises(ValueError, match="ChatRlmGraph: run_id cannot be a setting"):
        ChatRlmGraph(settings={"run_id": "x"})
