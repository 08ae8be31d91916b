"""The Python API: :func:`run` and :func:`arun`.

Example:
    >>> from rlm_graph import run
    >>> result = run("Who is the cat?", ["book.txt"])  # doctest: +SKIP
    >>> result.answer, result.citations[0].line  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError, ResumeMismatchError, SourceError, StoreError
from rlm_graph.graph import build_graph, outcome_of
from rlm_graph.models import ModelClient
from rlm_graph.nodes.delegate import Engine, Event
from rlm_graph.nodes.plan import make_plan
from rlm_graph.nodes.types import Answer, Outcome, Plan, entity_key
from rlm_graph.result import Citation, Failure, Joined, Result, TaskNode, Usage
from rlm_graph.source import Source, load_source, source_from_text
from rlm_graph.store import RunRecord, SourceInfo, Store, open_store, source_files_info

__all__ = ["aresume", "arun", "execute", "execute_nested", "prepare", "resume", "run"]

logger = logging.getLogger(__name__)


def run(
    question: str,
    paths: Sequence[str | PathLike[str]] | None = None,
    *,
    text: str | None = None,
    config: RunConfig | None = None,
    on_event: Callable[[Event], None] | None = None,
    store: str | PathLike[str] | None = None,
    run_id: str | None = None,
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
        store: where the run is checkpointed: an SQLite file, a
            ``postgresql://`` URL, or ``"memory"`` (not resumable); None uses
            ``$RLM_GRAPH_STORE`` or the per-user default file.
        run_id: a name for the run (letters, digits, ``._-``); a new random
            id when None.
        **settings: any :class:`RunConfig` field, e.g. ``model="openai/gpt-4o-mini"``;
            also ``schema=``: a pydantic model class (or a JSON Schema dict) of
            one record, for answers that are lists of such records (then
            ``Result.answer`` holds instances of that class).

    Raises:
        ConfigError: bad settings, an unknown model, a window too small.
        SourceError: a path cannot be read as text.
        StoreError: the store cannot be opened or the run id is taken.
        ModelCallError: the models cannot be reached at all (the run is
            kept and can be resumed).
    """
    _refuse_running_loop("run", "arun")
    return asyncio.run(arun(
        question, paths, text=text, config=config, on_event=on_event,
        store=store, run_id=run_id, **settings,
    ))


async def arun(
    question: str,
    paths: Sequence[str | PathLike[str]] | None = None,
    *,
    text: str | None = None,
    config: RunConfig | None = None,
    on_event: Callable[[Event], None] | None = None,
    store: str | PathLike[str] | None = None,
    run_id: str | None = None,
    **settings: Any,
) -> Result:
    """Answer ``question`` over files or a text, recursively.

    Same arguments as :func:`run`.
    """
    record_model = _record_model(settings)
    # Reading, counting and planning a large source takes seconds of CPU: in a
    # thread, so that the caller's event loop (a server's other requests) goes on.
    engine = await asyncio.to_thread(
        prepare, question, paths, text=text, config=config, on_event=on_event, **settings
    )
    engine.record_model = record_model
    async with open_store(store) as opened:
        result = await execute(engine, store=opened, run_id=run_id)
    if record_model is not None and result.kind == "schema" and result.answer:
        # Verify checked each record with the caller's class (a record it
        # rejected was asked again); this gives them back as that type.
        result.answer = [record_model.model_validate(record) for record in result.answer]
    return result


def resume(
    run_id: str,
    *,
    store: str | PathLike[str] | None = None,
    question: str | None = None,
    paths: Sequence[str | PathLike[str]] | None = None,
    stored_source: bool = False,
    on_event: Callable[[Event], None] | None = None,
    **settings: Any,
) -> Result:
    """Finish a run that was stopped, killed, or ended with failed parts; blocking.

    A run whose process died continues from its last checkpoint. A run that
    ended ``partial``, ``failed`` or ``stopped`` is executed again from the top,
    and every model call that already returned is answered from the store's
    call log, so only the failed or missing calls are sent.

    Args:
        run_id: the run (a unique prefix is enough).
        store: the store the run lives in (as for :func:`run`).
        question: if given, must equal the run's question (a safety check).
        paths: if given, the source must hash to the run's source.
        stored_source: use the stored copy of the source even if the files it
            was read from have changed since.
        on_event: receives progress events.
        **settings: settings that may change between attempts (``concurrency``,
            ``timeout_s``, ``max_retries``, ``api_key``, ``api_base``); any other
            setting must equal the run's.

    Raises:
        StoreError: no such run, or the store cannot be used.
        RunBusyError: another process is driving the run.
        ResumeMismatchError: the question, source or a setting differs.
    """
    _refuse_running_loop("resume", "aresume")
    return asyncio.run(aresume(
        run_id, store=store, question=question, paths=paths,
        stored_source=stored_source, on_event=on_event, **settings,
    ))


async def aresume(
    run_id: str,
    *,
    store: str | PathLike[str] | None = None,
    question: str | None = None,
    paths: Sequence[str | PathLike[str]] | None = None,
    stored_source: bool = False,
    on_event: Callable[[Event], None] | None = None,
    **settings: Any,
) -> Result:
    """Finish a run; same arguments as :func:`resume`."""
    async with open_store(store) as opened:
        record = await opened.get_run(run_id)
        _refuse_nested(record)
        _check_question(record, question)
        config = _resume_config(record, settings)
        source = await opened.load_source(record.source.digest)
        if paths is not None:
            given = _load(paths, None, config, None)
            if given.digest != source.digest:
                msg = (
                    f"The source given differs from run {record.run_id}'s source "
                    f"(sha256 {given.digest[:12]}, the run's {source.digest[:12]}). "
                    "Start a new run over it instead: unchanged pieces reuse recorded calls."
                )
                raise ResumeMismatchError(msg)
        elif not stored_source:
            _check_files_unchanged(record, config)
        if record.status == "done" and record.result is not None:
            logger.info("run %s is already done; returning its result", record.run_id)
            return Result.model_validate(record.result)
        client = ModelClient(config, on_call=_call_notifier(on_event))
        engine = Engine(source, config, Plan.model_validate(record.plan), client, emit=on_event)
        return await execute(engine, store=opened, record=record)


async def execute(
    engine: Engine,
    *,
    store: Store,
    run_id: str | None = None,
    record: RunRecord | None = None,
) -> Result:
    """Run a prepared engine's graph to the end in a store and build its result.

    With ``record`` (a resume), the run's thread continues from its last
    checkpoint, or, when that execution had finished, the graph runs again
    from the top on a new thread with every recorded call answered from the log.
    """
    started = time.monotonic()
    if record is None:
        record = await _new_record(engine, store, run_id)
    engine.client.call_log = store
    engine.client.run_id = record.run_id

    async with store.lock_run(record.run_id):
        graph = build_graph(engine, checkpointer=store.saver)
        state_input: dict[str, Any] | None = {"question": engine.plan.question}
        stage = await _thread_stage(graph, record.thread_id)
        if stage == "finished":
            record.executions += 1
            logger.info("run %s: execution %d; recorded calls are reused", record.run_id, record.executions)
        elif stage == "unfinished":
            state_input = None
            logger.info("run %s: continuing from its last checkpoint", record.run_id)
        async with _recorded(engine, store, record) as progress:
            state = await graph.ainvoke(
                state_input,
                {"configurable": {"thread_id": record.thread_id}, "recursion_limit": 100},
            )
        return await _finish(engine, store, record, progress, outcome_of(state), started)


async def execute_nested(
    engine: Engine,
    *,
    store: Store,
    run_id: str | None = None,
    parent: dict[str, str] | None = None,
) -> Result:
    """Run a prepared engine's graph inside the LangGraph graph running now.

    The graph is compiled without a checkpointer, so LangGraph lends it the
    running graph's: its checkpoints live in the parent's thread, and resuming
    the parent resumes it. The run is listed in ``store``'s registry
    (``rlm-graph runs``/``show``) and every model call goes to its call log.

    Args:
        run_id: the run's name; a run already registered under it (its parent
            was interrupted and is being resumed) is continued, not refused.
        parent: where the run's checkpoints are, for messages: ``thread_id``
            and ``namespace`` (the node's checkpoint namespace).
    """
    started = time.monotonic()
    record = None
    if run_id is not None:
        with contextlib.suppress(StoreError):
            record = await store.get_run(run_id)
        if record is not None and record.run_id != run_id:
            record = None  # only a prefix matched: another run
    if record is None:
        record = await _new_record(engine, store, run_id, parent=parent)
    else:
        logger.info("run %s: its parent graph resumed it", record.run_id)
    engine.client.call_log = store
    engine.client.run_id = record.run_id

    async with store.lock_run(record.run_id):
        async with _recorded(engine, store, record) as progress:
            # No checkpointer: LangGraph lends the parent's.
            values = await build_graph(engine).ainvoke(
                {"question": engine.plan.question}, {"recursion_limit": 100}
            )
        return await _finish(engine, store, record, progress, outcome_of(values), started)


@contextlib.asynccontextmanager
async def _recorded(engine: Engine, store: Store, record: RunRecord) -> AsyncIterator[_Progress]:
    """Mark the run running, save its progress while the block runs, and record
    it as interrupted if the block raises (a cancel included)."""
    progress = _Progress(engine, record)
    engine.add_listener(progress.on_event)
    record.status, record.error = "running", None
    await store.save_run(record)
    engine.emit(Event("run_started", data={"run_id": record.run_id, "store": store.location}))
    logger.info("run %s started: %s", record.run_id, engine.source.describe())

    autosave = asyncio.create_task(progress.autosave(store))
    try:
        yield progress
    except BaseException as exc:
        autosave.cancel()
        record.status = "interrupted"
        record.error = _short_error(exc)
        record.plan = engine.plan.model_dump(mode="json")
        record.progress = progress.snapshot()
        await asyncio.shield(store.save_run(record))
        raise
    autosave.cancel()


async def _finish(
    engine: Engine, store: Store, record: RunRecord, progress: _Progress,
    outcome: Outcome, started: float,
) -> Result:
    """Build the result of a finished graph and save it in the run's record."""
    result = build_result(record.run_id, engine, outcome, elapsed_s=time.monotonic() - started)
    # A resumed run reports what all its sessions paid, not only this one.
    result = result.model_copy(update={"usage": progress.total_usage()})
    record.status = result.status
    record.result = result.model_dump(mode="json")
    record.plan = engine.plan.model_dump(mode="json")
    record.progress = progress.snapshot()
    await store.save_run(record)
    logger.info("run %s finished: %s, %d calls", record.run_id, result.status, result.usage.calls)

    return result


def prepare(
    question: str,
    paths: Sequence[str | PathLike[str]] | None = None,
    *,
    text: str | None = None,
    config: RunConfig | None = None,
    on_event: Callable[[Event], None] | None = None,
    stdin_text: str | None = None,
    source: Source | None = None,
    **settings: Any,
) -> Engine:
    """Load the source, check the models and make the plan; no model call yet.

    Args:
        stdin_text: what to read for a ``-`` path instead of ``sys.stdin``.
        source: an already loaded source, instead of ``paths`` or ``text``.
    """
    _record_model(settings)
    config = _configure(config, settings)
    if source is not None and (paths or text is not None):
        msg = "Pass a source, paths or text, not several."
        raise ConfigError(msg)
    source = source if source is not None else _load(paths, text, config, stdin_text)
    client = ModelClient(config, on_call=_call_notifier(on_event))
    window = client.window("worker")
    plan = make_plan(
        question, source, config,
        count=lambda t: client.count_tokens("worker", t), window=window,
        local_worker=client.is_local("worker"),
    )
    return Engine(source, config, plan, client, emit=on_event)


def build_result(run_id: str, engine: Engine, outcome: Outcome, *, elapsed_s: float) -> Result:
    """Turn the root outcome into the public :class:`Result`."""
    source = engine.source
    answer = outcome.answer
    failures = [_failure(source, o) for o in _failed_leaves(outcome)]
    unanswered = bool(failures) and not _answered_any(outcome)
    if unanswered:
        # No span was answered: there is no answer, not an empty one.
        answer = None
    if outcome.status == "failed":
        status = "failed"
    elif any(failure.status == "stopped" for failure in failures):
        status = "stopped"
    elif unanswered:
        status = "failed"
    elif failures:
        status = "partial"
    else:
        status = "done"
    judged = [node.judge for node in _nodes(outcome) if node.judge is not None]

    return Result(
        run_id=run_id,
        status=status,
        question=engine.plan.question,
        kind=engine.plan.kind,
        answer=answer.value if answer is not None else None,
        found=bool(answer and answer.found),
        citations=[_citation(source, e.start, e.end) for e in (answer.evidence if answer else ())],
        joined=_joined(source, answer, engine.plan.conditions) if answer is not None else [],
        usage=engine.client.usage.model_copy(),
        failures=failures,
        tree=_tree(source, outcome),
        plan=engine.plan.model_dump(mode="json"),
        parts=len(engine.leaf_spans),
        skipped_parts=sum(
            engine.leaf_count(node.task) for node in _nodes(outcome) if node.verdict == "skipped"
        ),
        judged_parts=len(judged),
        unjudged_parts=judged.count("judge-unavailable"),
        elapsed_s=round(elapsed_s, 3),
        models={
            role: name for role, name in engine.client.models.items()
            if role != "judge" or engine.config.judge_model
        },
        stop_reason=engine.client.budget.reason if status == "stopped" else None,
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
            checked = RunConfig(**{**config.model_dump(), **settings})
            # Only the settings given count as set (a plan's ``overridden``).
            return config.model_copy(update={name: getattr(checked, name) for name in settings})
        except ValueError as exc:
            raise ConfigError(_first_error(exc)) from exc
    return config


_SETTING_NAMES = {"answer_schema": "schema"}
"""Settings named as the user passes them (``schema=``, ``--schema``)."""


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        where = _SETTING_NAMES.get(where, where)
        message = str(first.get("msg", "")).removeprefix("Value error, ").rstrip(".")
        return f"Invalid setting '{where}': {message}."
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


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

FREE_ON_RESUME = frozenset({
    "concurrency", "timeout_s", "max_retries", "api_key", "api_base",
    "max_calls", "max_tokens", "max_cost", "max_time_s", "price_in", "price_out",
})
"""Settings a resume may change: they affect how calls are made, not what is asked.
Budgets count again from zero in each execution (recorded calls are free)."""


def _refuse_running_loop(name: str, async_name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    msg = f"{name}() was called inside a running event loop; use 'await {async_name}(...)' instead."
    raise RuntimeError(msg)


async def _new_record(
    engine: Engine, store: Store, run_id: str | None, *, parent: dict[str, str] | None = None
) -> RunRecord:
    if run_id is None:
        run_id = f"run-{uuid.uuid4().hex[:12]}"
    elif not _RUN_ID.fullmatch(run_id):
        msg = f"Run id {run_id!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'."
        raise ConfigError(msg)
    else:
        with contextlib.suppress(StoreError):
            await store.get_run(run_id)
            msg = f"Run {run_id} already exists in {store.location}; resume it, or pick another id."
            raise ConfigError(msg)
    source = engine.source
    paths = [None if f.name.startswith("<") else Path(f.name).resolve() for f in source.files]
    record = RunRecord(
        run_id=run_id,
        question=engine.plan.question,
        source=SourceInfo(
            digest=source.digest, chars=len(source.text),
            files=source_files_info(source, paths),
        ),
        config=engine.config.model_dump(mode="json", exclude={"api_key"}),
        plan=engine.plan.model_dump(mode="json"),
        parent=parent,
    )
    await store.save_source(source)
    return record


async def _thread_stage(graph: Any, thread_id: str) -> str:
    """``new`` (no checkpoint yet), ``unfinished`` or ``finished``."""
    snapshot = await graph.aget_state({"configurable": {"thread_id": thread_id}})
    if not snapshot.values and not snapshot.next:
        return "new"
    return "unfinished" if snapshot.next else "finished"


def _refuse_nested(record: RunRecord) -> None:
    if record.parent is None:
        return
    thread = record.parent.get("thread_id", "?")
    msg = (
        f"Run {record.run_id} ran inside a LangGraph graph (thread {thread!r}, node "
        f"{record.parent.get('namespace', '?')!r}), whose checkpointer holds its state: "
        f"resume that graph instead, e.g. await graph.ainvoke(None, "
        f"{{'configurable': {{'thread_id': {thread!r}}}}})."
    )
    raise ConfigError(msg)


def _check_question(record: RunRecord, question: str | None) -> None:
    if question is not None and question.strip() != record.question.strip():
        msg = (
            f"Run {record.run_id} asked {record.question!r}, not {question!r}. "
            "A resume finishes the same question; ask a new one with 'rlm-graph run' "
            "(pieces already read are not paid for again)."
        )
        raise ResumeMismatchError(msg)


def _resume_config(record: RunRecord, settings: dict[str, Any]) -> RunConfig:
    stored = {k: v for k, v in record.config.items() if k in RunConfig.model_fields}
    effective = _configure(None, stored)
    # Compare what the run really used: no --worker-model means the root model.
    used = {"model": effective.root_model, "worker_model": effective.leaf_model}
    changed = {
        name: (used.get(name, record.config.get(name)), value)
        for name, value in settings.items()
        if name not in FREE_ON_RESUME and value != used.get(name, record.config.get(name))
    }
    if changed:
        shown = "; ".join(f"{name}: run has {old!r}, asked {new!r}" for name, (old, new) in changed.items())
        msg = (
            f"Run {record.run_id} cannot resume with different settings ({shown}). "
            f"Only {', '.join(sorted(FREE_ON_RESUME))} may change; start a new run for the rest."
        )
        raise ResumeMismatchError(msg)
    return _configure(None, {**stored, **settings})


def _check_files_unchanged(record: RunRecord, config: RunConfig) -> None:
    for info in record.source.files:
        path = info.get("path")
        if not path:
            continue
        if not Path(path).is_file():
            logger.warning("%s is gone; resuming over the stored copy of it", info["name"])
            continue
        try:
            current = load_source([path], encoding=config.encoding)
        except SourceError:
            continue
        first = current.files[0]
        text = current.text[first.start : first.end]
        now = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        if now != info.get("sha256"):
            msg = (
                f"{info['name']} changed since run {record.run_id} started "
                f"(sha256 was {str(info.get('sha256'))[:12]}, is {now[:12]}). "
                "Resume over the source as it was with --stored-source, or start a new run "
                "over the edited text (pieces that did not change reuse recorded calls)."
            )
            raise ResumeMismatchError(msg)


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return "stopped by the user"
    return f"{type(exc).__name__}: {exc}"[:500]


class _Progress:
    """Counts a run's events and saves a snapshot to the store every few seconds."""

    INTERVAL_S = 3.0
    FIRST_INTERVALS_S = (0.5, 1.0, 1.0, 2.0)
    """Saved sooner at the start, so that a run killed early still shows progress."""

    def __init__(self, engine: Engine, record: RunRecord) -> None:
        self._engine = engine
        self._record = record
        before = record.progress or {}
        self.tasks: dict[str, list[Any]] = dict(before.get("tasks") or {})
        self._before = Usage.model_validate(before.get("usage") or {})
        """What earlier sessions of this run paid for."""
        self._dirty = True

    def total_usage(self) -> Usage:
        """Usage over every session of the run (this one included)."""
        total = self._before.model_copy()
        total.add(self._engine.client.usage)
        return total

    def _leaves(self) -> int:
        spans = self._engine.__dict__.get("leaf_spans")
        if spans is not None:
            return len(spans)
        return max(1, -(-self._engine.plan.source_tokens // self._engine.plan.leaf_tokens))

    def on_event(self, event: Event) -> None:
        if event.kind == "task_started":
            data = event.data
            self.tasks[event.task_id] = [data.get("start", 0), data.get("end", 0), "running"]
        elif event.kind == "task_done" and event.task_id in self.tasks:
            self.tasks[event.task_id][2] = event.data.get("status", "done")
        self._dirty = True

    def snapshot(self) -> dict[str, Any]:
        usage = self.total_usage()
        parents = {task_id.rpartition(".")[0] for task_id in self.tasks}
        done = {task_id for task_id, (_, _, status) in self.tasks.items() if status != "running"}
        return {
            "tasks": self.tasks,
            "tasks_done": len(done),
            "leaves_done": len(done - parents),
            "leaves_estimate": self._leaves(),
            "usage": usage.model_dump(mode="json"),
            "calls": usage.calls, "cached_calls": usage.cached_calls,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cost_usd": usage.cost_usd, "cost_known": usage.cost_known,
        }

    async def autosave(self, store: Store) -> None:
        pauses = [*self.FIRST_INTERVALS_S]
        while True:
            await asyncio.sleep(pauses.pop(0) if pauses else self.INTERVAL_S)
            if self._dirty:
                self._dirty = False
                self._record.progress = self.snapshot()
                await store.save_run(self._record)


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


def _joined(source: Source, answer: Answer, conditions: tuple[str, ...]) -> list[Joined]:
    """A join answer's entities, each with its quote per condition."""
    if answer.kind != "join":
        return []
    by_entity: dict[str, dict[int, Citation]] = {}
    for match in answer.matches:
        found = _citation(source, match.evidence.start, match.evidence.end)
        by_entity.setdefault(entity_key(match.entity), {}).setdefault(match.condition, found)
    joined = []
    for item in answer.items:
        quotes = by_entity.get(entity_key(item.text), {})
        joined.append(Joined(entity=item.text, citations={
            condition: quotes[index] for index, condition in enumerate(conditions) if index in quotes
        }))
    return joined


def _answered_any(outcome: Outcome) -> bool:
    """Whether some leaf was read and answered (skipped leaves were not read)."""
    if not outcome.children:
        return outcome.status == "done" and outcome.verdict != "skipped"
    return any(_answered_any(child) for child in outcome.children)


def _nodes(outcome: Outcome) -> list[Outcome]:
    """Every outcome of the tree, the root first."""
    return [outcome, *(node for child in outcome.children for node in _nodes(child))]


def _failed_leaves(outcome: Outcome) -> list[Outcome]:
    if outcome.status in ("failed", "stopped") and not outcome.children:
        return [outcome]
    return [leaf for child in outcome.children for leaf in _failed_leaves(child)]


def _failure(source: Source, outcome: Outcome) -> Failure:
    location = source.locate(outcome.task.start)
    return Failure(
        task_id=outcome.task.id, source=location.file.name,
        start=location.offset, end=location.offset + (outcome.task.end - outcome.task.start),
        reason=outcome.reason or outcome.verdict,
        status="stopped" if outcome.status == "stopped" else "failed",
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
