"""Budgets of a run (calls, tokens, cost, time) and the dry-run estimate.

:class:`Budget` is checked by the model client before every attempt it sends.
Each attempt reserves its worst case (the prompt plus the whole output
allowance, at the model's price) while in flight, so calls running side by side
can never spend past a limit together. The first attempt that would cross a
limit is not sent: :class:`~rlm_graph.errors.BudgetExceeded` is raised, and
every later attempt is refused the same way, so the engine winds down with
what it has. Calls answered from the call log are free and still allowed.

:func:`estimate` walks the split tree the engine would make, without calling
a model, and prices it: what ``--dry-run`` prints.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from rlm_graph.config import RunConfig
from rlm_graph.errors import BudgetExceeded

if TYPE_CHECKING:
    from rlm_graph.nodes.delegate import Engine
    from rlm_graph.nodes.types import Task

__all__ = ["Budget", "Estimate", "estimate"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Reservation:
    tokens: int
    cost: float


class Budget:
    """The limits of one run and what has been spent against them.

    Args:
        config: where the limits come from (``max_calls``, ``max_tokens``,
            ``max_cost``, ``max_time_s``); None fields are unlimited.
        clock: seconds, monotonic; the run's time starts when the budget is made.
    """

    def __init__(
        self, config: RunConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_calls = config.max_calls
        self.max_tokens = config.max_tokens
        self.max_cost = config.max_cost
        self.max_time_s = config.max_time_s
        self._clock = clock
        self._started = clock()
        self.calls = 0
        """Attempts sent (each retry counts; none the Router refused unsent)."""
        self.tokens = 0
        """Prompt plus completion tokens of the attempts that returned, and the
        prompt tokens of those that timed out."""
        self.cost_usd = 0.0
        self._held_tokens = 0
        self._held_cost = 0.0
        self._in_flight = 0
        self._changed: asyncio.Event | None = None
        self._scopes: set[asyncio.Timeout] = set()
        """The timeout scopes of the waits in progress (see within_time)."""
        self.reason: str | None = None
        """Which limit stopped the run, once one has."""

    @property
    def is_stopped(self) -> bool:
        """Whether a limit was reached: every further attempt is refused."""
        return self.reason is not None

    def remaining_s(self) -> float | None:
        """Seconds left before ``max_time_s``; None without a time limit."""
        if self.max_time_s is None:
            return None
        return self.max_time_s - (self._clock() - self._started)

    def reserve(self, tokens: int, cost: float | None) -> _Reservation:
        """Count one attempt and hold its worst-case tokens and cost.

        Args:
            tokens: prompt tokens plus the output allowance.
            cost: what those tokens cost at most; None when unknown (then
                ``max_cost`` was refused before the run started).

        Raises:
            BudgetExceeded: sending this attempt could cross a limit.
        """
        if self.reason is not None:
            raise BudgetExceeded(self._message())
        crossed = self._crossed(tokens, cost or 0.0)
        if crossed is not None:
            raise self.stop(*crossed)
        return self._take(tokens, cost)

    async def admit(self, tokens: int, cost: float | None) -> _Reservation:
        """Like :meth:`reserve`, but waits while only calls in flight stand in the way.

        The worst cases held for calls in flight are usually far above what
        they spend. An attempt that would fit once they settle waits for them
        (until the run's time is up) instead of stopping the run; one that
        would not fit even with nothing in flight stops it.

        Raises:
            BudgetExceeded: a limit is reached (or the time ran out waiting).
        """
        while True:
            if self.reason is not None:
                raise BudgetExceeded(self._message())
            crossed = self._crossed(tokens, cost or 0.0, held=False)
            if crossed is not None:
                raise self.stop(*crossed)
            if self._in_flight == 0 or self._crossed(tokens, cost or 0.0) is None:
                return self._take(tokens, cost)
            changed = self._changed = self._changed or asyncio.Event()
            changed.clear()
            remaining = self.remaining_s()
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError as exc:
                raise self.time_up() from exc

    def _take(self, tokens: int, cost: float | None) -> _Reservation:
        self.calls += 1
        self._in_flight += 1
        self._held_tokens += tokens
        self._held_cost += cost or 0.0
        return _Reservation(tokens, cost or 0.0)

    def _changed_now(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _crossed(
        self, tokens: int, cost: float, *, held: bool = True
    ) -> tuple[str, str] | None:
        """The limit (name, value) one more attempt could cross, if any.

        ``held``: count the worst cases of the calls in flight too.
        """
        held_tokens = self._held_tokens if held else 0
        held_cost = self._held_cost if held else 0.0
        if self.max_calls is not None and self.calls + 1 > self.max_calls:
            return "max-calls", f"{self.max_calls} calls"
        if (
            self.max_tokens is not None
            and self.tokens + held_tokens + tokens > self.max_tokens
        ):
            return "max-tokens", f"{self.max_tokens:,} tokens"
        if (
            self.max_cost is not None
            and self.cost_usd + held_cost + cost > self.max_cost
        ):
            return "max-cost", f"${self.max_cost:g}"
        remaining = self.remaining_s()
        if remaining is not None and remaining <= 0:
            return "max-time", f"{self.max_time_s:g} s"
        return None

    def count_unreserved(self, tokens: int, cost: float | None) -> _Reservation:
        """Count an attempt that went out without a reservation; settle it as usual."""
        return self._take(tokens, cost)

    def cancel(self, reservation: _Reservation) -> None:
        """Give back an attempt that was never sent: its call and its hold."""
        self.calls -= 1
        self._in_flight -= 1
        self._held_tokens -= reservation.tokens
        self._held_cost -= reservation.cost
        self._changed_now()

    def settle(self, reservation: _Reservation, tokens: int, cost: float) -> None:
        """Replace an attempt's reservation by what it really spent."""
        self._in_flight -= 1
        self._held_tokens -= reservation.tokens
        self._held_cost -= reservation.cost
        self.tokens += tokens
        self.cost_usd += cost
        self._changed_now()

    def time_up(self) -> BudgetExceeded:
        """Stop the run on its time limit (once); the error to raise."""
        return self.stop("max-time", f"{self.max_time_s:g} s")

    async def within_time(
        self, wait: Any, undo: Callable[[], None] | None = None, *, ready: bool = False
    ) -> Any:
        """Await ``wait`` (a coroutine), but no longer than the run's time left.

        Every wait of a call (parallel slots, quota pauses, rpm/tpm pace) goes
        through here, so none outlives ``--max-time``, and none outlives a
        budget another call has reached.

        The wait runs in the caller's task under an :func:`asyncio.timeout`
        scope; a budget reached elsewhere moves every open scope's deadline to
        now. An earlier version watched each wait with two extra tasks and
        ``asyncio.wait``: three event-loop turns per wait, several per cent of
        the throughput at 8 calls in flight (docs/design.md, "Throughput").

        Args:
            wait: what to await.
            undo: called if ``wait`` finished just as it was abandoned (to
                give back a slot it took).
            ready: the caller knows ``wait`` finishes without suspending (a free
                slot, a pace with room): it is awaited without a scope, after
                the same checks.

        Raises:
            BudgetExceeded: the time ran out, or a budget stopped the run.
        """
        if self.reason is not None:
            wait.close()
            raise BudgetExceeded(self._message())
        remaining = self.remaining_s()
        if remaining is not None and remaining <= 0:
            wait.close()
            raise self.time_up()
        if ready:
            return await wait
        loop = asyncio.get_running_loop()
        scope = asyncio.timeout_at(None if remaining is None else loop.time() + remaining)
        finished = False
        try:
            async with scope:
                self._scopes.add(scope)
                result = await wait
                finished = True
                return result
        except TimeoutError:
            if not scope.expired():
                raise
        finally:
            self._scopes.discard(scope)
            if finished and scope.expired() and undo is not None:
                # It took its slot just as the time ran out: give it back.
                undo()
        if self.reason is not None:
            raise BudgetExceeded(self._message())
        raise self.time_up()

    def stop(self, limit: str, value: str) -> BudgetExceeded:
        """Mark the budget reached (once) and return the error to raise."""
        if self.reason is None:
            self.reason = f"{limit} budget of {value} reached"
            logger.info("%s; no further model calls are sent", self.reason)
            # Every wait in progress ends now (see within_time).
            for scope in tuple(self._scopes):
                if not scope.expired():
                    scope.reschedule(-1.0)
            self._changed_now()
        return BudgetExceeded(self._message())

    def _message(self) -> str:
        return f"stopped: {self.reason}"


class Estimate(BaseModel):
    """What a run would do, from the split tree alone (``--dry-run``)."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    pieces: int
    """Spans read by one leaf call each."""
    skipped: int
    """Leaf spans the plan's filter skips unread (``pieces + skipped`` is
    every leaf span of the cut)."""
    plan_calls: int = 0
    """1 when the root model will plan the run (``planner="model"``), else 0."""
    leaf_calls: int
    merge_calls: int
    """Free-text merge calls if every piece finds something (an upper bound)."""
    calls: int
    """Plan, leaf and merge calls, first attempts only (retries and re-asks
    add more)."""
    prompt_tokens: int
    """Prompt tokens of the plan and leaf calls: what a run without failures
    sends before merging. Counted with the worker's tokenizer, without the
    safety margin added for other vendors' models (their tokenizers may count
    up to ~20 % more)."""
    merge_prompt_tokens: int = 0
    """Prompt tokens of the merge calls if every piece finds something, each
    partial answer at its longest (an upper bound; pieces that find nothing
    are not merged)."""
    completion_tokens: int
    """Output allowance of every call (an upper bound)."""
    cost_usd: float | None
    """At the models' prices, for every token above (an upper bound); None
    when a price is unknown."""
    depth: int
    """Deepest level of the split tree."""


def estimate(engine: Engine) -> Estimate:
    """Walk the split tree of a prepared run and count its calls, tokens and cost.

    No model is called. The tree is the one the run would cut before any
    failure makes it split finer, with the plan the rules made (a model's
    plan, made when the run starts, can differ).
    """
    from rlm_graph.nodes.delegate import PLAN_OUTPUT_TOKENS
    from rlm_graph.nodes.types import Task

    plan = engine.plan
    root = Task(
        id="0",
        start=0,
        end=len(engine.source.text),
        depth=0,
        question=plan.question,
        tokens=plan.source_tokens,
    )
    leaves: list[Task] = []
    skipped, merges, depth = 0, 0, 0
    stack = [root]
    while stack:
        task = stack.pop()
        depth = max(depth, task.depth)
        if not engine.passes_filter(task):
            skipped += engine.leaf_count(task)
            continue
        children = engine.split(task)
        if not children:
            leaves.append(task)
            continue
        stack.extend(children)
        if plan.kind == "text":
            # Children the filter skips find nothing, and nothing is not merged.
            read = sum(engine.passes_filter(child) for child in children)
            merges += _merge_calls(read, plan.fan_in)

    worker_margin = engine.client.count_margin("worker")
    leaf_prompt = round(
        sum(_leaf_prompt_tokens(engine, t) for t in leaves) / worker_margin
    )
    plan_prompt = _plan_prompt_tokens(engine)
    merge_prompt = merges * _merge_prompt_tokens(engine)
    plan_calls = 1 if plan_prompt else 0
    leaf_out = len(leaves) * plan.output_tokens
    merge_out = merges * plan.max_output_tokens
    plan_out = plan_calls * PLAN_OUTPUT_TOKENS

    return Estimate(
        pieces=len(leaves),
        skipped=skipped,
        plan_calls=plan_calls,
        leaf_calls=len(leaves),
        merge_calls=merges,
        calls=plan_calls + len(leaves) + merges,
        prompt_tokens=plan_prompt + leaf_prompt,
        merge_prompt_tokens=merge_prompt,
        completion_tokens=plan_out + leaf_out + merge_out,
        cost_usd=_priced(
            engine,
            leaf_prompt,
            leaf_out,
            plan_prompt + merge_prompt,
            plan_out + merge_out,
        ),
        depth=depth,
    )


def _leaf_prompt_tokens(engine: Engine, task: Task) -> int:
    """Worker tokens of a leaf's prompt: its span plus the instructions around it."""
    return task.tokens + _leaf_overhead(engine)


def _leaf_overhead(engine: Engine) -> int:
    from rlm_graph.nodes.prompts import leaf_messages
    from rlm_graph.nodes.types import Task

    cached = engine.__dict__.get("_estimate_overhead")
    if cached is None:
        plan = engine.plan
        probe = Task(
            id="0", start=0, end=0, depth=0, question=plan.sub_question, tokens=0
        )
        empty = leaf_messages(
            plan.kind,
            probe,
            "",
            feedback=None,
            file_hint=engine.source.locate(0).file.name,
            record_schema=plan.record_schema,
            conditions=plan.conditions,
            entity=plan.entity,
        )
        cached = engine.client.count_tokens(
            "worker", "\n".join(m["content"] for m in empty)
        )
        engine.__dict__["_estimate_overhead"] = cached
    return int(cached)


def _plan_prompt_tokens(engine: Engine) -> int:
    """Root tokens of the planning call the run will make; 0 when it makes none."""
    from rlm_graph.nodes.plan import PLANNED_FIELDS, plan_messages, preview_source

    plan = engine.plan
    if engine.config.planner != "model" or plan.made_by != "rules":
        return 0
    if set(PLANNED_FIELDS) <= set(plan.overridden):
        return 0  # flags fixed every planned field: the run makes no planning call
    count = functools.partial(engine.client.count_tokens, "root")
    preview = preview_source(engine.source, count)
    messages = plan_messages(engine.plan.question, preview, engine.plan)
    text = "\n".join(m["content"] for m in messages)
    return round(count(text) / engine.client.count_margin("root"))


def _merge_prompt_tokens(engine: Engine) -> int:
    """Root tokens of one full merge call: fan-in partial answers at their longest."""
    from rlm_graph.nodes.prompts import ANSWER_MAX_CHARS, merge_messages

    text = engine.source.text
    middle = max(len(text) // 2 - ANSWER_MAX_CHARS // 2, 0)
    # A partial answer is at most ANSWER_MAX_CHARS characters of text much
    # like the source's: a slice of it counts like one.
    partial = text[middle : middle + ANSWER_MAX_CHARS]
    messages = merge_messages(engine.plan.question, [partial] * engine.plan.fan_in)
    tokens = engine.client.count_tokens(
        "root", "\n".join(m["content"] for m in messages)
    )
    return round(tokens / engine.client.count_margin("root"))


def _merge_calls(children: int, fan_in: int) -> int:
    """Calls a tree of merges with fan-in ``fan_in`` needs for ``children`` answers."""
    return math.ceil((children - 1) / (fan_in - 1)) if children > 1 else 0


def _priced(
    engine: Engine, leaf_in: int, leaf_out: int, root_in: int, root_out: int
) -> float | None:
    worker, root = engine.client.prices("worker"), engine.client.prices("root")
    if worker is None or (root is None and root_in):
        return None
    cost = leaf_in * worker[0] + leaf_out * worker[1]
    if root is not None:
        cost += root_in * root[0] + root_out * root[1]
    return cost
