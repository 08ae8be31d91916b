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

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

        self.calls += 1
        self._held_tokens += tokens
        self._held_cost += cost or 0.0
        return _Reservation(tokens, cost or 0.0)

    def _crossed(self, tokens: int, cost: float) -> tuple[str, str] | None:
        """The limit (name, value) one more attempt could cross, if any."""
        if self.max_calls is not None and self.calls + 1 > self.max_calls:
            return "max-calls", f"{self.max_calls} calls"
        if (
            self.max_tokens is not None
            and self.tokens + self._held_tokens + tokens > self.max_tokens
        ):
            return "max-tokens", f"{self.max_tokens:,} tokens"
        if (
            self.max_cost is not None
            and self.cost_usd + self._held_cost + cost > self.max_cost
        ):
            return "max-cost", f"${self.max_cost:g}"
        remaining = self.remaining_s()
        if remaining is not None and remaining <= 0:
            return "max-time", f"{self.max_time_s:g} s"
        return None

    def cancel(self, reservation: _Reservation) -> None:
        """Give back an attempt that was never sent: its call and its hold."""
        self.calls -= 1
        self._held_tokens -= reservation.tokens
        self._held_cost -= reservation.cost

    def settle(self, reservation: _Reservation, tokens: int, cost: float) -> None:
        """Replace an attempt's reservation by what it really spent."""
        self._held_tokens -= reservation.tokens
        self._held_cost -= reservation.cost
        self.tokens += tokens
        self.cost_usd += cost

    def stop(self, limit: str, value: str) -> BudgetExceeded:
        """Mark the budget reached (once) and return the error to raise."""
        if self.reason is None:
            self.reason = f"{limit} budget of {value} reached"
            logger.info("%s; no further model calls are sent", self.reason)
        return BudgetExceeded(self._message())

    def _message(self) -> str:
        return f"stopped: {self.reason}"


class Estimate(BaseModel):
    """What a run would do, from the split tree alone (``--dry-run``)."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    pieces: int
    """Spans read by one leaf call each."""
    skipped: int
    """Spans the plan's filter skips unread."""
    leaf_calls: int
    merge_calls: int
    """Free-text merge calls if every piece finds something (an upper bound)."""
    calls: int
    """Leaf plus merge calls, first attempts only (retries and re-asks add more)."""
    prompt_tokens: int
    completion_tokens: int
    """Output allowance of every call (an upper bound)."""
    cost_usd: float | None
    """At the models' prices; None when a price is unknown."""
    depth: int
    """Deepest level of the split tree."""


def estimate(engine: Engine) -> Estimate:
    """Walk the split tree of a prepared run and count its calls, tokens and cost.

    No model is called. The tree is the one the run would cut before any
    failure makes it split finer.
    """
    from rlm_graph.nodes.prompts import leaf_messages, merge_messages
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
            skipped += 1
            continue
        children = engine.split(task)
        if children:
            stack.extend(children)
            if plan.kind == "text":
                merges += _merge_calls(len(children), plan.fan_in)
        else:
            leaves.append(task)

    empty = leaf_messages(
        plan.kind, root.model_copy(update={"end": 0}), "", feedback=None, file_hint=""
    )
    overhead = engine.client.count_tokens(
        "worker", "\n".join(m["content"] for m in empty)
    )
    leaf_prompt = sum(task.tokens + overhead for task in leaves)
    merge_prompt = (
        merges
        * engine.client.count_tokens(
            "root",
            "\n".join(
                m["content"]
                for m in merge_messages(plan.question, ["x" * 4] * plan.fan_in)
            ),
        )
        + merges * plan.fan_in * plan.output_tokens
    )
    leaf_out = len(leaves) * plan.output_tokens
    merge_out = merges * plan.max_output_tokens

    return Estimate(
        pieces=len(leaves),
        skipped=skipped,
        leaf_calls=len(leaves),
        merge_calls=merges,
        calls=len(leaves) + merges,
        prompt_tokens=leaf_prompt + merge_prompt,
        completion_tokens=leaf_out + merge_out,
        cost_usd=_priced(engine, leaf_prompt, leaf_out, merge_prompt, merge_out),
        depth=depth,
    )


def _merge_calls(children: int, fan_in: int) -> int:
    """Calls a tree of merges with fan-in ``fan_in`` needs for ``children`` answers."""
    return math.ceil((children - 1) / (fan_in - 1)) if children > 1 else 0


def _priced(
    engine: Engine, leaf_in: int, leaf_out: int, merge_in: int, merge_out: int
) -> float | None:
    worker, root = engine.client.prices("worker"), engine.client.prices("root")
    if worker is None or (root is None and merge_in):
        return None
    cost = leaf_in * worker[0] + leaf_out * worker[1]
    if root is not None:
        cost += merge_in * root[0] + merge_out * root[1]
    return cost
