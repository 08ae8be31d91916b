"""The three methods the harness compares, all on the same model and prompts.

- ``direct``: one call with the source truncated to what fits the window.
- ``mapreduce``: a flat map-reduce. The source is cut once into spans of the
  same size and overlap rlm-graph uses; every span gets one call with the same
  leaf prompt (spans without a match of ``config.filter`` are skipped, as
  rlm-graph skips them); one model call merges the partial answers (as many as
  fit its window), with no verification and no recursion. A join span's
  partial answer lists each entity with the conditions it meets there.
- ``rlm``: rlm-graph itself (:func:`rlm_graph.arun`).

Each returns a :class:`MethodRun`: the answer value, calls, tokens, cost, time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Literal

from pydantic import BaseModel

from rlm_graph.config import RunConfig
from rlm_graph.eval.generators import Instance
from rlm_graph.filtering import compile_filter, filter_matches
from rlm_graph.models import Completion, ModelClient
from rlm_graph.nodes.plan import make_plan
from rlm_graph.nodes.prompts import leaf_messages, merge_messages, schema_for
from rlm_graph.nodes.types import Task
from rlm_graph.nodes.verify import parse_json_reply
from rlm_graph.source import Source
from rlm_graph.split import split_span
from rlm_graph.tokens import context_window

__all__ = ["METHODS", "MethodName", "MethodRun", "run_method"]

logger = logging.getLogger(__name__)

MethodName = Literal["direct", "mapreduce", "rlm"]
METHODS: tuple[MethodName, ...] = ("direct", "mapreduce", "rlm")


class MethodRun(BaseModel):
    """What one method did on one instance."""

    method: str
    answer: Any = None
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    error: str | None = None
    """Why the method gave no answer (an exception's message), if it failed."""
    plan_made_by: str | None = None
    """rlm only: who made the run's plan (``model`` or ``rules (...)``)."""


async def run_method(
    method: MethodName, instance: Instance, source: Source, config: RunConfig
) -> MethodRun:
    """Run one method on one instance's source and time it.

    Args:
        source: the instance's files as one source
            (:func:`rlm_graph.eval.harness.instance_source`).
    """
    started = time.monotonic()
    try:
        if method == "rlm":
            result = await _rlm(instance, source, config)
        else:
            client = ModelClient(config)
            runner = _direct if method == "direct" else _mapreduce
            answer = await runner(instance, source, config, client)
            usage = client.usage
            result = MethodRun(
                method=method,
                answer=answer,
                calls=usage.calls,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_usd=usage.cost_usd,
            )
    except Exception as exc:  # a method that breaks scores 0, and says why
        logger.warning("%s on %s failed: %s", method, instance.name, exc)
        result = MethodRun(method=method, error=f"{type(exc).__name__}: {exc}")

    return result.model_copy(update={"elapsed_s": round(time.monotonic() - started, 2)})


async def _rlm(instance: Instance, source: Source, config: RunConfig) -> MethodRun:
    from rlm_graph.api import execute, prepare
    from rlm_graph.store import open_store

    # In memory: evaluation runs are not for resuming, and must not fill (or
    # wait on a lock of) the user's run store.
    engine = prepare(instance.question, source=source, config=config)
    async with open_store("memory") as store:
        result = await execute(engine, store=store)
    usage = result.usage
    return MethodRun(
        method="rlm",
        answer=result.answer if result.found else None,
        calls=usage.calls,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_usd=usage.cost_usd,
        plan_made_by=(result.plan or {}).get("made_by"),
        error=None if result.status != "failed" else "every part failed",
    )


async def _direct(
    instance: Instance, source: Source, config: RunConfig, client: ModelClient
) -> Any:
    window = context_window(config.leaf_model, config.context_window)
    # One call reads as much as the window holds, not a leaf-sized span.
    whole = config.model_copy(update={"chunk_tokens": 10**9})
    budget = _leaf_budget(instance, source, whole, client, window)
    text = _truncate(source.text, budget, lambda t: client.count_tokens("worker", t))
    completion = await _leaf_call(instance, text, client, config, source)
    value = _value(config.kind, completion)
    if config.kind == "join":
        # One call saw everything it was sent: it joins what it found.
        return _joined(value, len(config.conditions)) if value is not None else None
    return value


async def _mapreduce(
    instance: Instance, source: Source, config: RunConfig, client: ModelClient
) -> Any:
    window = context_window(config.leaf_model, config.context_window)
    budget = _leaf_budget(instance, source, config, client, window)
    spans = split_span(
        source.text,
        0,
        len(source.text),
        max_tokens=budget,
        count_tokens=lambda t: client.count_tokens("worker", t),
        overlap_tokens=min(config.overlap_tokens, budget // 4),
        hard_boundaries=source.file_starts,
    )
    if config.filter:
        wanted = compile_filter(config.filter)
        try:
            matching = [(a, b) for a, b in spans if filter_matches(wanted, source.text, a, b)]
        except TimeoutError:
            matching = []  # a filter that backtracks past its cap means no filter
        spans = matching or spans  # a filter that drops everything means no filter
    completions = await asyncio.gather(
        *(
            _leaf_call(instance, source.text[start:end], client, config, source)
            for start, end in spans
        )
    )
    if config.kind == "join":
        partials = [_render_join(_value("join", c), config.conditions) for c in completions]
    else:
        partials = [_render(_value(config.kind, c)) for c in completions]
    return await _model_merge(instance, partials, client, config, window)


def _leaf_budget(
    instance: Instance, source: Any, config: RunConfig, client: ModelClient, window: int
) -> int:
    # The same arithmetic as rlm-graph's plan, so all methods read equal spans.
    plan = make_plan(
        instance.question,
        source,
        config,
        count=lambda t: client.count_tokens("worker", t[:400_000]),
        window=window,
    )
    return plan.leaf_tokens


async def _leaf_call(
    instance: Instance,
    text: str,
    client: ModelClient,
    config: RunConfig,
    source: Source,
) -> Completion | None:
    kind = config.kind if config.kind != "auto" else instance.kind
    task = Task(
        id="0", start=0, end=len(text), depth=0, question=instance.question, tokens=0
    )
    messages = leaf_messages(
        kind, task, text, feedback=None, file_hint=source.files[0].name,
        conditions=config.conditions, entity=config.entity,
    )
    try:
        return await client.complete(
            "worker",
            messages,
            max_tokens=config.max_output_tokens,
            schema=schema_for(kind, conditions=len(config.conditions)),
        )
    except Exception as exc:
        logger.info("leaf call failed: %s", exc)
        return None


async def _model_merge(
    instance: Instance,
    partials: list[str],
    client: ModelClient,
    config: RunConfig,
    window: int,
) -> Any:
    stated = [p for p in partials if p]
    if not stated:
        return None
    if len(stated) == 1:
        if config.kind == "join":
            return _joined(_parse_join_partial(stated[0], config.conditions), len(config.conditions))
        return _parse_merged(config.kind, stated[0])
    # One flat merge call: the partial answers that fit its window, in order.
    limit = int(window * 0.9) - config.max_output_tokens - 200
    kept, size = [], 0
    for partial in stated:
        size += client.count_tokens("root", partial) + 6
        if size > limit:
            logger.info(
                "flat merge keeps %d of %d partial answers (window)",
                len(kept),
                len(stated),
            )
            break
        kept.append(partial)
    messages = merge_messages(instance.question, kept)
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    completion = await client.complete(
        "root", messages, max_tokens=config.max_output_tokens, schema=schema
    )
    data = parse_json_reply(completion.text)
    text = str(data.get("answer", "")) if isinstance(data, dict) else completion.text
    return _parse_merged(config.kind, text)


def _truncate(text: str, budget: int, count: Any) -> str:
    cut = min(len(text), budget * 6)
    while cut > 0 and count(text[:cut]) > budget:
        cut = int(cut * 0.93)
    return text[:cut]


def _value(kind: str, completion: Completion | None) -> Any:
    """The answer a leaf reply states, taken at its word (no verification)."""
    if completion is None:
        return None
    data = parse_json_reply(completion.text)
    if not isinstance(data, dict):
        return None
    if kind == "count":
        try:
            return int(data.get("count") or 0)
        except (TypeError, ValueError):
            return None
    if kind == "list":
        return [
            str(i.get("item", ""))
            for i in data.get("items") or []
            if isinstance(i, dict)
        ]
    if kind == "join":
        met: dict[str, set[int]] = {}
        for match in data.get("matches") or []:
            if isinstance(match, dict) and isinstance(match.get("condition"), int):
                met.setdefault(str(match.get("entity", "")).strip(), set()).add(match["condition"])
        met.pop("", None)
        return met
    if kind == "table":
        rows = data.get("rows") or []
        return {
            str(r.get("label")): int(r.get("count") or 0)
            for r in rows
            if isinstance(r, dict)
        }
    answer = str(data.get("answer") or "").strip()
    return None if not answer or answer.casefold() == "not stated" else answer


def _render(value: Any) -> str:
    if value is None or value == [] or value == {}:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{label}: {n}" for label, n in value.items())
    if isinstance(value, list):
        return "; ".join(value)
    return str(value)


def _joined(met: dict[str, set[int]], conditions: int) -> list[str]:
    """The entities a reply shows meeting every condition (numbered from 1)."""
    wanted = set(range(1, conditions + 1))
    return sorted(entity for entity, numbers in met.items() if numbers >= wanted)


def _render_join(met: dict[str, set[int]] | None, conditions: tuple[str, ...]) -> str:
    """A span's join reply as a partial answer a merge model can read: each
    entity with the conditions it meets there, in words."""
    if not met:
        return ""
    return "; ".join(
        f"{entity} ({', '.join(conditions[n - 1] for n in sorted(numbers) if 0 < n <= len(conditions))})"
        for entity, numbers in sorted(met.items())
    )


def _parse_join_partial(text: str, conditions: tuple[str, ...]) -> dict[str, set[int]]:
    """Read back :func:`_render_join`."""
    met: dict[str, set[int]] = {}
    for entity, said in re.findall(r"([^;()]+?) \(([^()]*)\)", text):
        numbers = {i + 1 for i, c in enumerate(conditions) if c in said}
        met.setdefault(entity.strip(), set()).update(numbers)
    return met


def _parse_merged(kind: str, text: str) -> Any:
    if kind == "count":
        number = re.search(r"\d+", text)
        return int(number.group(0)) if number else None
    if kind in ("list", "join"):
        return [v.strip() for v in text.split(";") if v.strip()]
    if kind == "table":
        return {label: int(n) for label, n in re.findall(r"(\w+): (\d+)", text)}
    return text.strip() or None
