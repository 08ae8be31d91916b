"""A LangChain tool that answers a question over a source too big for a context."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForToolRun,
    CallbackManagerForToolRun,
)
from langchain_core.tools import BaseTool, ToolException
from pydantic import ConfigDict, Field, ValidationError

from langchain_rlm_graph._common import (
    AsyncProgressRelay,
    RlmGraphInput,
    SyncProgressRelay,
    blocking,
    check_paths,
    split_settings,
)
from rlm_graph import Result, RlmGraphError, RunConfig, arun
from rlm_graph.chat import answer_text

__all__ = ["RlmGraphTool"]

_DESCRIPTION = (
    "Answer a question over files, folders or a text that are too large to read "
    "directly (books, logs, code bases, document folders). It reads every part "
    "with a fresh model call, checks each answer against the text and merges "
    "them; the reply quotes its evidence with line numbers. Give the question "
    "and either paths or text."
)


def _explain_bad_arguments(exc: ValidationError) -> str:
    """Tell the agent what was wrong with its arguments, so it can call again."""
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
        for e in exc.errors()
    )
    return (
        f"Invalid arguments ({problems}). Give 'question' and either 'paths' or 'text'."
    )


class RlmGraphTool(BaseTool):
    """Ask rlm-graph a question over files, folders or a long text.

    The content the agent sees is the answer with its supporting quotes; the
    artifact is the full :class:`rlm_graph.Result` (citations, usage, tree).
    Errors (a missing file, a path outside ``root_dir``, a failed run) come
    back to the agent as the tool's message, so it can correct itself.

    Example:
        >>> from langchain_rlm_graph import RlmGraphTool
        >>> tool = RlmGraphTool(model="openai/gpt-4o-mini", root_dir="docs")
        >>> tool.invoke({"question": "Which services restart nightly?",
        ...              "paths": ["ops/"]})  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "ask_large_source"
    description: str = _DESCRIPTION
    args_schema: type[RlmGraphInput] = RlmGraphInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool = True
    handle_validation_error: Callable[[ValidationError], str] = _explain_bad_arguments  # type: ignore[assignment]  # narrower than BaseTool's union

    config: RunConfig | None = None
    """Settings of every run; None reads ``RLM_GRAPH_*`` variables."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """:class:`~rlm_graph.RunConfig` fields overriding ``config``."""
    root_dir: Path | None = Field(default_factory=Path.cwd)
    """Folder the agent may read from (default: the working directory when the
    tool was made); None lets it read any path the process can."""
    with_citations: bool = True
    """Append the supporting quotes to the answer the agent reads."""
    store: str | None = None
    """Where runs are recorded (SQLite file or PostgreSQL URL); None:
    ``$RLM_GRAPH_STORE``, else the per-user store."""

    def __init__(self, **kwargs: Any) -> None:
        """Create the tool; unknown keywords are :class:`~rlm_graph.RunConfig` fields."""
        kwargs = split_settings(type(self), kwargs)
        super().__init__(**kwargs)

    def _run(
        self,
        question: str,
        paths: list[str] | None = None,
        text: str | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, Result]:
        relay = (
            SyncProgressRelay(run_manager.handlers, run_manager.run_id)
            if run_manager
            else None
        )
        return blocking(
            self._answer(question, paths, text, relay.on_event if relay else None)
        )

    async def _arun(
        self,
        question: str,
        paths: list[str] | None = None,
        text: str | None = None,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, Result]:
        if run_manager is None:
            return await self._answer(question, paths, text, None)
        async with AsyncProgressRelay(
            run_manager.handlers, run_manager.run_id
        ) as relay:
            return await self._answer(question, paths, text, relay.on_event)

    async def _answer(
        self, question: str, paths: list[str] | None, text: str | None, on_event: Any
    ) -> tuple[str, Result]:
        try:
            files = check_paths(paths, self.root_dir) if paths else None
            result = await arun(
                question,
                files,
                text=text,
                config=self.config,
                on_event=on_event,
                store=self.store,
                **self.settings,
            )
            return answer_text(result, with_citations=self.with_citations), result
        except (RlmGraphError, ValueError) as exc:
            # Every error of the product (a bad path, a model that failed, a store
            # that cannot be used, a run that is busy) goes back to the agent.
            raise ToolException(str(exc)) from exc
