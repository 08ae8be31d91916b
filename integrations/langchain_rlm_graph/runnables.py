"""rlm-graph as a LangChain ``Runnable``, for LCEL chains."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
)
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field

from langchain_rlm_graph._common import (
    AsyncProgressRelay,
    RlmGraphInput,
    SyncProgressRelay,
    blocking,
    parse_input,
    split_settings,
)
from rlm_graph import Result, RunConfig, arun

__all__ = ["RlmGraphRunnable"]


class RlmGraphRunnable(RunnableSerializable[RlmGraphInput | dict[str, Any], Result]):
    """A runnable from a question and a source to an :class:`rlm_graph.Result`.

    Input is a dict (or :class:`RlmGraphInput`) with ``question`` and either
    ``paths`` or ``text``; output is the run's :class:`~rlm_graph.Result`.
    Progress goes to callback handlers as ``rlm_graph_progress`` custom events
    (visible in ``astream_events``). Errors are rlm-graph's own
    (:class:`~rlm_graph.ConfigError`, :class:`~rlm_graph.SourceError`, ...).

    Example:
        >>> from langchain_core.runnables import RunnableLambda
        >>> from langchain_rlm_graph import RlmGraphRunnable
        >>> chain = RlmGraphRunnable(model="openai/gpt-4o-mini") | RunnableLambda(
        ...     lambda result: result.answer)
        >>> chain.invoke({"question": "Who wins?", "paths": ["book.txt"]})  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: RunConfig | None = None
    """Settings of every run; None reads ``RLM_GRAPH_*`` variables."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """:class:`~rlm_graph.RunConfig` fields overriding ``config``."""
    store: str | None = None
    """Where runs are recorded (SQLite file or PostgreSQL URL); None:
    ``$RLM_GRAPH_STORE``, else the per-user store."""

    def __init__(self, **kwargs: Any) -> None:
        """Create the runnable; unknown keywords are :class:`~rlm_graph.RunConfig` fields."""
        kwargs = split_settings(type(self), kwargs)
        super().__init__(**kwargs)

    @property
    def InputType(self) -> type[RlmGraphInput]:
        """The input schema: a question and paths or text."""
        return RlmGraphInput

    @property
    def OutputType(self) -> type[Result]:
        """The output: an :class:`rlm_graph.Result`."""
        return Result

    def invoke(
        self,
        input: RlmGraphInput | dict[str, Any],
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Result:
        """Run the recursion to the end; blocking."""
        return self._call_with_config(
            self._invoke, input, config, run_type="chain", **kwargs
        )

    async def ainvoke(
        self,
        input: RlmGraphInput | dict[str, Any],
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Result:
        """Run the recursion to the end."""
        return await self._acall_with_config(
            self._ainvoke, input, config, run_type="chain", **kwargs
        )

    def _invoke(
        self,
        input: RlmGraphInput | dict[str, Any],
        run_manager: CallbackManagerForChainRun,
    ) -> Result:
        relay = SyncProgressRelay(run_manager.handlers, run_manager.run_id)
        return blocking(self._run(parse_input(input), relay.on_event))

    async def _ainvoke(
        self,
        input: RlmGraphInput | dict[str, Any],
        run_manager: AsyncCallbackManagerForChainRun,
    ) -> Result:
        asked = parse_input(input)
        async with AsyncProgressRelay(
            run_manager.handlers, run_manager.run_id
        ) as relay:
            return await self._run(asked, relay.on_event)

    async def _run(self, asked: RlmGraphInput, on_event: Any) -> Result:
        return await arun(
            asked.question,
            asked.paths,
            text=asked.text,
            config=self.config,
            on_event=on_event,
            store=self.store,
            **self.settings,
        )
