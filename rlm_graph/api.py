"""The Python API: :func:`run` and :func:`arun`.

Example:
    >>> from rlm_graph import run
    >>> result = run("Who is the cat?", ["book.txt"])  # doctest: +SKIP
    >>> result.answer, result.citations[0].line  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

from pydantic import BaseModel

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError
from rlm_graph.graph import build_graph
from rlm_graph.models import ModelClient
from rlm_graph.nodes.delegate import Engine, Event
from rlm_graph.nodes.plan import make_plan
from rlm_graph.nodes.types import Outcome
from rlm_graph.result import Citation, Failure, Result, TaskNode
from rlm_graph.source import Source, load_source, source_from_text
from rlm_graph.tokens import context_window

__all__ = ["arun", "execute", "prepare", "run"]

logger = logging.getLogger(__name__)


def run(
    question: str,
    paths: Sequence[str | PathLike[str]] | None = None,
    *,
    text: str | None = None,
    config: RunConfig | None = None,
    on_event: Callable[[Event], None] | None = None,
    **settings: Any,
) -> Result:
    """Answer ``question`` over files or a text, recursively; blocking.

    A thin wrapper over :func:`arun`; inside a running event loop, await
    :func:`arun` instead.

    Args:
        question: what to ask.
        paths: files, directories (their text files, recursively) or ``-``.
        text: a text held in memory, instead of ``paths``.
        config: the run configuration; ``settings`` override its fields.
        on_event: receives progress events while the run goes on.
        **settings: any :class:`RunConfig` field, e.g. ``model="openai/gpt-4o-mini"``;
            also ``schema=``: a pydantic model class (or a JSON Schema dict) of
            one record, for answers that are lists of such records (then
            ``Result.answer`` holds instances of that class).

    Raises:
        ConfigError: bad settings, an unknown model, a window too small.
        SourceError: a path cannot be read as text.
        ModelCallError: the models cannot be reached at all.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        msg = "run() was called inside a running event loop; use 'await arun(...)' instead."
        raise RuntimeError(msg)
    return asyncio.run(
        arun(question, paths, text=text, config=config, on_event=on_event, **settings)
    )


async def arun(
    question: str,
    paths: Sequence[str | PathLike[str]] | None = None,
    *,
    text: str | None = None,
    config: RunConfig | None = None,
    on_event: Callable[[Event], None] | None = None,
    **settings: Any,
) -> Result:
    """Answer ``question`` over files or a text, recursively.

    Same arguments as :func:`run`.
    """
    record_model = _record_model(settings)
    engine = prepare(question, paths, text=text, config=config, on_event=on_event, **settings)
    result = await execute(engine)
    if record_model is not None and result.kind == "schema" and result.answer:
        # Records passed the schema's JSON check in verify; this gives them
        # back as the caller's own type.
        result.answer = [record_model.model_validate(record) for record in result.answer]
    return result


async def execute(engine: Engine, *, run_id: str | None = None) -> Result:
    """Run a prepared engine's graph to the end and build its result."""
    from langgraph.checkpoint.memory import InMemorySaver

    started = time.monotonic()
    run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
    graph = build_graph(engine, checkpointer=InMemorySaver())
    logger.info("run %s started: %s", run_id, engine.source.describe())

    state = await graph.ainvoke(
        {"question": engine.plan.question},
        {"configurable": {"thread_id": run_id}, "recursion_limit": 100},
    )
    outcome = Outcome.model_validate(state["outcome"])
    result = build_result(run_id, engine, outcome, elapsed_s=time.monotonic() - started)
    logger.info("run %s finished: %s, %d calls", run_id, result.status, result.usage.calls)

    return result


def prepare(
    question: str,
    paths: Sequence[str | PathLike[str]] | None = None,
    *,
    text: str | None = None,
    config: RunConfig | None = None,
    on_event: Callable[[Event], None] | None = None,
    stdin_text: str | None = None,
    **settings: Any,
) -> Engine:
    """Load the source, check the models and make the plan; no model call yet.

    Args:
        stdin_text: what to read for a ``-`` path instead of ``sys.stdin``.
    """
    _record_model(settings)
    config = _configure(config, settings)
    source = _load(paths, text, config, stdin_text)
    client = ModelClient(config, on_call=_call_notifier(on_event))
    window = context_window(config.leaf_model, config.context_window)
    plan = make_plan(
        question, source, config,
        count=lambda t: client.count_tokens("worker", t), window=window,
    )
    return Engine(source, config, plan, client, emit=on_event)


def build_result(run_id: str, engine: Engine, outcome: Outcome, *, elapsed_s: float) -> Result:
    """Turn the root outcome into the public :class:`Result`."""
    source = engine.source
    answer = outcome.answer
    failures = [_failure(source, o) for o in _failed_leaves(outcome)]
    if outcome.status == "failed":
        status = "failed"
    elif failures:
        status = "partial"
    else:
        status = "done"

    return Result(
        run_id=run_id,
        status=status,
        question=engine.plan.question,
        kind=engine.plan.kind,
        answer=answer.value if answer is not None else None,
        found=bool(answer and answer.found),
        citations=[_citation(source, e.start, e.end) for e in (answer.evidence if answer else ())],
        usage=engine.client.usage.model_copy(),
        failures=failures,
        tree=_tree(source, outcome),
        plan=engine.plan.model_dump(mode="json"),
        elapsed_s=round(elapsed_s, 3),
        models=dict(engine.client.models),
    )


def _record_model(settings: dict[str, Any]) -> type[BaseModel] | None:
    """Turn a ``schema=`` setting into ``answer_schema``; return the model class."""
    schema = settings.pop("schema", None)
    if schema is None:
        return None
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        settings["answer_schema"] = schema.model_json_schema()
        return schema
    if isinstance(schema, dict):
        settings["answer_schema"] = schema
        return None
    msg = f"schema= must be a pydantic model class or a JSON Schema dict, not {type(schema).__name__}."
    raise ConfigError(msg)


def _configure(config: RunConfig | None, settings: dict[str, Any]) -> RunConfig:
    if config is None:
        try:
            return RunConfig(**settings)
        except ValueError as exc:
            raise ConfigError(_first_error(exc)) from exc
    if settings:
        try:
            return config.model_copy(update=RunConfig(**{**config.model_dump(), **settings}).model_dump())
        except ValueError as exc:
            raise ConfigError(_first_error(exc)) from exc
    return config


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"Invalid setting '{where}': {first.get('msg')}."
    return str(exc)


def _load(
    paths: Sequence[str | PathLike[str]] | None,
    text: str | None,
    config: RunConfig,
    stdin_text: str | None,
) -> Source:
    if text is not None and paths:
        msg = "Pass either paths or text, not both."
        raise ConfigError(msg)
    if text is not None:
        return source_from_text(text)
    return load_source(list(paths or []), encoding=config.encoding, stdin_text=stdin_text)


def _call_notifier(on_event: Callable[[Event], None] | None) -> Any:
    if on_event is None:
        return None

    def notify(role: str, completion: Any) -> None:
        on_event(Event("call_done", data={
            "role": role, "cached": completion.cached,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        }))

    return notify


def _citation(source: Source, start: int, end: int) -> Citation:
    location = source.locate(start)
    return Citation(
        source=location.file.name,
        start=location.offset,
        end=location.offset + (end - start),
        line=location.line,
        quote=source.text[start:end],
    )


def _failed_leaves(outcome: Outcome) -> list[Outcome]:
    if outcome.status == "failed" and not outcome.children:
        return [outcome]
    return [leaf for child in outcome.children for leaf in _failed_leaves(child)]


def _failure(source: Source, outcome: Outcome) -> Failure:
    location = source.locate(outcome.task.start)
    return Failure(
        task_id=outcome.task.id, source=location.file.name,
        start=location.offset, end=location.offset + (outcome.task.end - outcome.task.start),
        reason=outcome.reason or outcome.verdict,
    )


def _tree(source: Source, outcome: Outcome) -> TaskNode:
    answer = outcome.answer
    return TaskNode(
        id=outcome.task.id,
        depth=outcome.task.depth,
        start=outcome.task.start,
        end=outcome.task.end,
        source=source.locate(outcome.task.start).file.name,
        question=outcome.task.question,
        answer=answer.value if answer is not None and answer.found else None,
        verdict=outcome.verdict,
        status=outcome.status,
        attempts=outcome.attempts,
        judge=outcome.judge,
        children=[_tree(source, child) for child in outcome.children],
    )
