"""Public records of a run: Result, Citation, Usage and the recursion tree."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Citation", "Failure", "Joined", "Result", "RunStatus", "TaskNode", "Usage"]

RunStatus = Literal["done", "partial", "failed", "stopped"]


class _Record(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")


class Citation(_Record):
    """A verbatim quote from the source that supports the answer."""

    source: str
    """The file the quote is in (as named by the user), or ``<stdin>``/``<text>``."""
    start: int = Field(ge=0)
    """Character offset of the quote's start in that file's decoded text."""
    end: int = Field(ge=0)
    """Character offset just past the quote's end."""
    line: int = Field(ge=1)
    """1-based line of the quote's start."""
    quote: str
    """The quoted text, exactly as it stands in the source."""


class Joined(_Record):
    """One entity of a join answer and, per condition, a quote showing it meets it."""

    entity: str
    """The entity as first written in the source."""
    citations: dict[str, Citation]
    """Condition (as planned) to the first place in the source that shows the
    entity meets it; one entry per condition, in the plan's order."""


class Usage(_Record):
    """Model calls and what they cost."""

    calls: int = 0
    """Model calls sent (retries of one call count once each attempt). An
    attempt the Router refused before sending anything is not a call."""
    cached_calls: int = 0
    """Calls answered from the call log that no session of this run paid for
    (recorded by another run, a dry run's planning call, or asked twice in one
    session). Calls an earlier session of the run paid for, which a resume
    replays from the log, are in ``calls`` once and not here."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    """Cost from LiteLLM's offline price map; local models cost 0."""
    cost_known: bool = True
    """False when some call's model had no known price (its cost counted as 0)."""
    timed_out_calls: int = 0
    """Attempts that timed out (also in ``calls``). Their prompt tokens are
    counted in ``prompt_tokens`` and cost: a provider may bill them."""

    def add(self, other: Usage) -> None:
        """Add another usage record to this one, in place."""
        self.calls += other.calls
        self.cached_calls += other.cached_calls
        self.timed_out_calls += other.timed_out_calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.cost_known = self.cost_known and other.cost_known


class Failure(_Record):
    """A task that could not be answered; the answer is partial without it."""

    task_id: str
    source: str
    start: int
    end: int
    reason: str
    status: Literal["failed", "stopped"] = "failed"
    """failed: given up after retries; stopped: a budget ended the run first
    (a resumed run with a larger budget answers it)."""


class TaskNode(_Record):
    """One task of the recursion tree, as reported in ``Result.tree``."""

    id: str
    """Path from the root: ``0``, ``0.2``, ``0.2.1`` ..."""
    depth: int
    start: int
    """Span start, as an offset in the joined source text."""
    end: int
    source: str
    """The file the span starts in."""
    question: str
    """The sub-question this task answered."""
    answer: Any = None
    """The task's answer, or None when it found nothing. For kinds merged by code
    (every kind but text) only the root keeps its answer: each parent's answer
    already holds its children's items and quotes."""
    verdict: str = "ok"
    """What verify said: ok, skipped, no-evidence, unbacked, malformed,
    truncated, split-after-..., ..."""
    status: Literal["done", "failed", "stopped"] = "done"
    attempts: int = 0
    """Model calls this task made itself (children not included)."""
    judge: str | None = None
    """The judge model's verdict on this task's answer (None: not judged)."""
    children: list[TaskNode] = Field(default_factory=list)


class Result(_Record):
    """What a run returns."""

    run_id: str
    status: RunStatus
    """done: every task answered; partial: some failed (see ``failures``);
    stopped: a budget ended the run, the answer covers the parts done before
    it; failed: no part could be answered."""
    question: str
    kind: str
    """Answer kind: text, short, list, count, table, yesno, schema or join."""
    answer: Any
    """Depends on ``kind``: text; a list of strings; an integer; a
    ``{label: count}`` dict; True/False (False with ``found`` False when no
    evidence was found); a list of records (dicts valid under the schema); for
    ``join``, the sorted list of entities that meet every condition (``joined``
    has their quotes).
    With status ``partial`` it covers only the parts that were answered; with
    status ``failed`` (no part answered) it is None for every kind."""
    found: bool = True
    """False when no part of the source answered the question."""
    citations: list[Citation] = Field(default_factory=list)
    joined: list[Joined] = Field(default_factory=list)
    """Join answers: each listed entity with one quote per condition (the same
    quotes are in ``citations``, in source order). Empty for other kinds."""
    usage: Usage = Field(default_factory=Usage)
    failures: list[Failure] = Field(default_factory=list)
    tree: TaskNode | None = None
    plan: dict[str, Any] | None = None
    """The plan the run followed: kind, sub-question, span sizes, filter, and who
    made it (``made_by``; a ``filter`` in ``overridden`` is the user's)."""
    parts: int = 0
    """Leaf spans the plan cut the source into."""
    skipped_parts: int = 0
    """Of ``parts``, those the plan's filter skipped unread: the answer says
    nothing about them. 0 without a filter."""
    judged_parts: int = 0
    """Answers the judge model was asked to check (0 without a judge)."""
    unjudged_parts: int = 0
    """Of ``judged_parts``, answers the judge gave no verdict on, even when asked
    again: they are kept unchecked (the status does not change)."""
    elapsed_s: float = 0.0
    stop_reason: str | None = None
    """Which budget stopped the run, when ``status`` is stopped."""
    models: dict[str, str] = Field(default_factory=dict)
    """Role to model name, as used (``judge`` only when a judge model ran)."""
