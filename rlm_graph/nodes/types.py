"""Records that flow between the stages: tasks, plans, answers and outcomes.

They cross checkpoint boundaries as plain dicts (``model_dump(mode="json")``)
and are validated again when read back, so nothing that fails its schema is
ever stored as a result and every stored value can be reloaded.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Answer", "Evidence", "Item", "Kind", "Match", "Outcome", "Plan", "Record", "Row", "Task",
    "condition_key", "entity_key",
]

Kind = Literal["text", "short", "list", "count", "table", "yesno", "schema", "join"]
"""Answer kinds: free text, a short answer copied from the source, a list of items, a count, a table of labelled counts,
yes/no with evidence, records following a user's JSON schema, or the entities that meet every one of
several conditions (``join``: each condition may be met in a different part of the source)."""


def entity_key(name: str) -> str:
    """How join answers match entity names: ignoring case, spaces and end
    punctuation ("U 12", "u12" and "U12." are one entity)."""
    return re.sub(r"\s+", "", name).casefold().strip(".,;:!?\"'`()[]")


def condition_key(condition: str) -> str:
    """How join conditions are told apart: two that differ only in case,
    spacing or end punctuation are the same condition."""
    return re.sub(r"\s+", "", condition).casefold().strip(".,;:!?\"'`")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(_Record):
    """One node of the recursion tree: a question over a span."""

    id: str
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    depth: int = Field(ge=0)
    question: str
    tokens: int = Field(ge=0)
    """Worker-tokenizer length of the span."""
    leaves: tuple[int, int] | None = None
    """The run of leaf spans ``[first, stop)`` this task covers (see :mod:`rlm_graph.tree`)."""
    height: int = Field(default=0, ge=0)
    """Its height in the content-defined tree: 0 for a single leaf."""
    rejected_splits: int = Field(default=0, ge=0)
    """How many times a span above it was split finer because its answers were
    rejected (not for size): such splits are capped, so a model that keeps
    failing on a span cannot multiply its calls level after level."""

    @model_validator(mode="after")
    def _ordered(self) -> Task:
        if self.end < self.start:
            msg = f"task {self.id}: span end {self.end} is before its start {self.start}"
            raise ValueError(msg)
        return self


class Plan(_Record):
    """How the run cuts the source and what it asks of each piece."""

    kind: Kind
    question: str
    sub_question: str
    leaf_tokens: int = Field(gt=0)
    """Largest span a leaf call reads."""
    overlap_tokens: int = Field(ge=0)
    output_tokens: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    """Ceiling when a truncated answer is retried with more room."""
    window: int = Field(gt=0)
    """Worker context window used for the pre-flight size check."""
    fan_out: int = Field(ge=2)
    fan_in: int = Field(ge=2)
    max_depth: int = Field(ge=1)
    source_tokens: int = Field(ge=0)
    filter: str | None = None
    """Case-insensitive regex; spans without a match are skipped unread."""
    record_schema: dict[str, Any] | None = None
    """JSON schema of one record, for the ``schema`` kind."""
    conditions: tuple[str, ...] = ()
    """For the ``join`` kind: what an entity must meet, each condition on its
    own (``("have a refund record", "have a shipping record")``). Leaves are
    asked about each one; merge keeps the entities that meet them all."""
    entity: str | None = None
    """For the ``join`` kind: what the answer lists, as the question names it
    (``users``); None when the question did not say."""
    made_by: str = "rules"
    """Who made the plan: ``rules``, ``model`` (the root model),
    ``rules (model plan rejected: ...)``, or ``flags (no planning call)`` when
    flags fixed every planned field; flags override either."""
    overridden: tuple[str, ...] = ()
    """Plan fields the user's flags set."""


class Evidence(_Record):
    """A quote located in the source: absolute offsets in the joined text."""

    quote: str
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class Item(_Record):
    """One element of a list answer, with where it was seen."""

    text: str
    evidence: Evidence | None = None


class Row(_Record):
    """One labelled count of a table answer, with the occurrences behind it."""

    label: str
    count: int = Field(ge=0)
    evidence: tuple[Evidence, ...] = ()


class Match(_Record):
    """One finding of a join answer: an entity that meets one condition, and where."""

    entity: str
    condition: int = Field(ge=0)
    """Index into the plan's ``conditions`` (0 for the first)."""
    evidence: Evidence


class Record(_Record):
    """One record of a schema answer: data valid under the user's schema."""

    data: dict[str, Any]
    evidence: Evidence | None = None


class Answer(_Record):
    """A typed answer of one task."""

    kind: Kind
    found: bool
    text: str | None = None
    items: tuple[Item, ...] = ()
    count: int | None = Field(default=None, ge=0)
    rows: tuple[Row, ...] = ()
    """Table answers: one row per label."""
    flag: bool | None = None
    """Yes/no answers: True for yes, False for no, None when no part stated it
    (the answer's value is then False: no evidence found)."""
    records: tuple[Record, ...] = ()
    """Schema answers."""
    matches: tuple[Match, ...] = ()
    """Join answers: per entity and condition, the first place it was seen to
    meet it (entities meeting only some conditions included: another part of
    the source may hold the rest). ``items`` holds the entities that meet all."""
    evidence: tuple[Evidence, ...] = ()

    @property
    def value(self) -> Any:
        """The answer as the user sees it: text, list, int, ``{label: count}``,
        bool (False when no evidence of yes was found), a list of records
        (dicts), or for ``join`` the list of entities that meet every condition."""
        if self.kind == "count":
            return self.count if self.count is not None else 0
        if self.kind in ("list", "join"):
            return [item.text for item in self.items]
        if self.kind == "table":
            return {row.label: row.count for row in self.rows}
        if self.kind == "yesno":
            return bool(self.flag)
        if self.kind == "schema":
            return [record.data for record in self.records]
        return self.text if self.found else None


class Outcome(_Record):
    """What a task produced: its answer, verdict and the subtree below it."""

    task: Task
    answer: Answer | None = None
    status: Literal["done", "failed", "stopped"] = "done"
    """stopped: a budget ended the run before this task was answered."""
    verdict: str = "ok"
    reason: str | None = None
    attempts: int = 0
    judge: str | None = None
    """The judge model's verdict on this leaf's answer (None: not judged)."""
    children: tuple[Outcome, ...] = ()
