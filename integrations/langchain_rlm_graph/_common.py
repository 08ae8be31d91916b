"""What the LangChain adapters share: input validation, runs, progress relays."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlm_graph import ConfigError

__all__ = [
    "split_settings",
    "PROGRESS_EVENT",
    "AsyncProgressRelay",
    "RlmGraphInput",
    "SyncProgressRelay",
    "blocking",
]

PROGRESS_EVENT = "rlm_graph_progress"
"""Name of the custom callback event carrying a run's progress."""

_T = TypeVar("_T")


class RlmGraphInput(BaseModel):
    """A question over files, folders or a text too big for a model's context."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(
        min_length=1, description="The question to answer from the source."
    )
    paths: list[str] | None = Field(
        default=None,
        description="Files or folders to read (their text files, recursively). Give paths or text.",
    )
    text: str | None = Field(
        default=None, description="A text to read instead of files."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RlmGraphInput:
        if bool(self.paths) == bool(self.text):
            msg = (
                "Give either 'paths' (files or folders) or 'text', exactly one of them."
            )
            raise ValueError(msg)
        return self


def parse_input(value: Any) -> RlmGraphInput:
    """Validate a runnable's input.

    Raises:
        ConfigError: no question, or not exactly one of paths and text.
    """
    try:
        return RlmGraphInput.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "input"
        msg = (
            f"Invalid rlm-graph input at '{where}': {first.get('msg')}. Pass a dict with "
            "'question' and either 'paths' or 'text'."
        )
        raise ConfigError(msg) from exc


def check_paths(paths: list[str], root_dir: Path | None) -> list[str]:
    """Resolve ``paths`` against ``root_dir`` and refuse any outside it.

    Raises:
        ValueError: a path outside ``root_dir``.
    """
    if root_dir is None:
        return paths
    root = root_dir.resolve()
    checked = []
    for path in paths:
        full = (root / path).resolve()
        if full != root and root not in full.parents:
            msg = f"Path {path!r} is outside the folder this tool may read ({root})."
            raise ValueError(msg)
        checked.append(str(full))
    return checked


def event_data(event: Any) -> dict[str, Any]:
    """A run's progress event as plain, JSON-ready data."""
    return {
        "kind": event.kind,
        "task_id": event.task_id,
        "depth": event.depth,
        **event.data,
    }


class SyncProgressRelay:
    """Forward a blocking run's progress to callback handlers as custom events."""

    def __init__(self, handlers: list[Any], run_id: UUID) -> None:
        self._manager = CallbackManager(handlers=handlers)
        self._run_id = run_id

    def on_event(self, event: Any) -> None:
        """Send one progress event (the run calls this)."""
        self._manager.on_custom_event(
            PROGRESS_EVENT, event_data(event), run_id=self._run_id
        )


class AsyncProgressRelay:
    """Forward an async run's progress to callback handlers, in order.

    The run reports progress from plain callbacks; async handlers are awaited
    one by one by a relay task, so events arrive in the order they happened.
    """

    def __init__(self, handlers: list[Any], run_id: UUID) -> None:
        self._manager = AsyncCallbackManager(handlers=handlers)
        self._run_id = run_id
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def on_event(self, event: Any) -> None:
        """Queue one progress event (the run calls this, inside the loop)."""
        self._queue.put_nowait(event_data(event))

    async def __aenter__(self) -> AsyncProgressRelay:
        self._task = asyncio.create_task(self._relay())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task

    async def _relay(self) -> None:
        while (data := await self._queue.get()) is not None:
            await self._manager.on_custom_event(
                PROGRESS_EVENT, data, run_id=self._run_id
            )


def blocking(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine from blocking code, even when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


_PER_CALL = frozenset({"run_id", "text", "on_event", "question", "paths"})
"""Arguments of :func:`rlm_graph.arun` that belong to one call, not to a component."""


def split_settings(
    component: type[BaseModel], kwargs: dict[str, Any], *, unknown_are_settings: bool = True
) -> dict[str, Any]:
    """The keywords of a LangChain component, with every RunConfig field in ``settings``.

    Unknown keywords are RunConfig fields (if ``unknown_are_settings``); a
    field of the component's own given inside ``settings``
    (``settings={"store": ...}``) is taken as that field.

    Raises:
        ValueError: an argument that belongs to one call (``run_id``, ``text``)
            was given as a setting of every call.
    """
    fields = component.model_fields
    own = set(fields) | {f.alias for f in fields.values() if f.alias}
    settings = (
        {k: kwargs.pop(k) for k in list(kwargs) if k not in own} if unknown_are_settings else {}
    )
    given = dict(kwargs.get("settings") or {})
    for key in own & given.keys():
        kwargs.setdefault(key, given.pop(key))
    fixed = sorted(_PER_CALL & (given.keys() | settings.keys()))
    if fixed:
        raise ValueError(
            f"{component.__name__}: {', '.join(fixed)} cannot be a setting of every call "
            "(each call is its own run, on the question and sources it is given); "
            "leave it out"
        )
    kwargs["settings"] = {**given, **settings}
    return kwargs
