"""A LangChain chat model that answers over arbitrarily long messages by recursion."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field

from langchain_rlm_graph._common import (
    AsyncProgressRelay,
    SyncProgressRelay,
    blocking,
    split_settings,
)
from rlm_graph import Result, RunConfig, arun
from rlm_graph.chat import answer_text, question_from_messages

__all__ = ["ChatRlmGraph"]


class ChatRlmGraph(BaseChatModel):
    """A chat model whose replies come from a recursive run over the conversation.

    The last human message is the question; every message before it (system
    prompt, pasted documents, earlier turns) is the source, however long. A
    single human message is split at its last blank line: the text above is
    the source, the last paragraph the question (see :mod:`rlm_graph.chat`).

    The reply's ``usage_metadata`` sums every model call of the run;
    ``response_metadata`` has the run id, status and citations. While the run
    goes on, progress reaches callback handlers as ``rlm_graph_progress``
    custom events (``on_custom_event``; ``astream_events`` shows them). The
    answer itself arrives whole when the run ends, also when streaming.
    Tool calling is not supported (``bind_tools`` raises).

    Example:
        >>> from langchain_rlm_graph import ChatRlmGraph
        >>> llm = ChatRlmGraph(model="openai/gpt-4o", worker_model="openai/gpt-4o-mini")
        >>> llm.invoke([("system", long_report), ("human", "Which risks are named?")])  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str | None = Field(default=None, alias="model_name")
    """Root model (plans, merges); None: ``config``'s, else the embedded model."""
    worker_model: str | None = None
    """Model for leaf calls; None: ``config``'s, else ``model``."""
    config: RunConfig | None = None
    """Settings of every run; None reads ``RLM_GRAPH_*`` variables."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """More :class:`~rlm_graph.RunConfig` fields (``context_window``, ...)."""
    with_citations: bool = True
    """Append the supporting quotes to the reply's text."""
    store: str | None = None
    """Where runs are recorded (SQLite file or PostgreSQL URL); None:
    ``$RLM_GRAPH_STORE``, else the per-user store."""

    def __init__(self, **kwargs: Any) -> None:
        """Create the chat model; a field given inside ``settings`` is taken as the field."""
        super().__init__(**split_settings(type(self), kwargs, unknown_are_settings=False))

    @property
    def _llm_type(self) -> str:
        return "rlm-graph"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "worker_model": self.worker_model, **self.settings}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        relay = (
            SyncProgressRelay(run_manager.handlers, run_manager.run_id)
            if run_manager
            else None
        )
        return blocking(self._answer(messages, relay.on_event if relay else None))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if run_manager is None:
            return await self._answer(messages, None)
        async with AsyncProgressRelay(
            run_manager.handlers, run_manager.run_id
        ) as relay:
            return await self._answer(messages, relay.on_event)

    async def _answer(self, messages: list[BaseMessage], on_event: Any) -> ChatResult:
        asked = question_from_messages(convert_to_openai_messages(messages))
        settings = dict(self.settings)
        if self.model is not None:
            settings["model"] = self.model
        if self.worker_model is not None:
            settings["worker_model"] = self.worker_model
        result = await arun(
            asked.question,
            text=asked.text,
            config=self.config,
            on_event=on_event,
            store=self.store,
            **settings,
        )
        message = AIMessage(
            content=answer_text(result, with_citations=self.with_citations),
            usage_metadata=_usage_metadata(result),
            response_metadata=_response_metadata(result),
        )

        return ChatResult(generations=[ChatGeneration(message=message)])


def _usage_metadata(result: Result) -> dict[str, int]:
    usage = result.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _response_metadata(result: Result) -> dict[str, Any]:
    return {
        "model_name": f"rlm/{result.models.get('worker', '')}",
        "run_id": result.run_id,
        "status": result.status,
        "found": result.found,
        "answer": result.answer,
        "citations": [c.model_dump(mode="json") for c in result.citations],
        "calls": result.usage.calls,
    }
