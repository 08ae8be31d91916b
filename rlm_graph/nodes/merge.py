"""Merge: combine the children's answers into their parent's answer.

Every kind but free text is merged by code, exactly: counts and table rows are
summed, lists and records are united, yes/no answers are combined by rule,
and short answers (copied from the source) are chosen among by how well their
sentences match the question. Neighbouring spans overlap, so
the same occurrence can be reported twice; occurrences are matched by where
their evidence sits in the source, and an item or a counted occurrence seen by
two children is kept once. Free text needs language and is merged by the root
model, in groups of at most ``fan_in`` answers at a time (see
:mod:`rlm_graph.nodes.delegate`, which owns model calls).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

from rlm_graph.nodes.types import Answer, Evidence, Item, Match, Outcome, Row, entity_key

_T = TypeVar("_T")

__all__ = [
    "dedupe_text",
    "join_matches",
    "merge_join",
    "short_candidates",
    "merge_by_code",
    "merge_count",
    "merge_list",
    "merge_records",
    "merge_table",
    "merge_yesno",
    "natural_key",
    "usable_answers",
]


def usable_answers(children: list[Outcome] | tuple[Outcome, ...]) -> list[Answer]:
    """Answers of children that finished and found something, in source order."""
    ordered = sorted(children, key=lambda o: (o.task.start, o.task.end))
    return [o.answer for o in ordered if o.status == "done" and o.answer is not None and o.answer.found]


def merge_list(answers: list[Answer]) -> Answer:
    """Union of list answers, de-duplicated by where each item's evidence sits.

    An item two overlapping spans both quoted is kept once; equal names quoted
    at distinct places are distinct items, so the result does not depend on
    how the source was cut. Items without evidence match by name.
    """
    items = _distinct_by_place(
        [list(answer.items) for answer in answers], lambda item: item.evidence, lambda item: item.text
    )
    evidence = tuple(item.evidence for item in items if item.evidence)
    return Answer(kind="list", found=bool(items), items=tuple(items), evidence=evidence)


def merge_count(answers: list[Answer]) -> Answer:
    """Sum of count answers, minus occurrences that two overlapping spans both saw.

    An occurrence is the same when its evidence sits at the same place in the
    source (the same offsets); a set makes this linear in the evidence.
    """
    total, evidence = _sum_distinct((a.count or 0, a.evidence) for a in answers)
    return Answer(kind="count", found=total > 0, count=total, evidence=evidence)


def merge_table(answers: list[Answer]) -> Answer:
    """Per-label sums of table answers, each label de-duplicated like a count.

    Labels match ignoring case and whitespace; the first spelling seen is kept.
    """
    by_label: dict[str, list[Row]] = {}
    for answer in answers:
        for row in answer.rows:
            by_label.setdefault(_normal(row.label), []).append(row)
    rows = []
    for group in by_label.values():
        total, evidence = _sum_distinct((r.count, r.evidence) for r in group)
        rows.append(Row(label=group[0].label, count=total, evidence=evidence))
    rows.sort(key=lambda r: (-r.count, r.label))

    evidence = tuple(sorted((e for r in rows for e in r.evidence), key=lambda e: e.start))
    return Answer(kind="table", found=any(r.count for r in rows), rows=tuple(rows), evidence=evidence)


def merge_yesno(answers: list[Answer]) -> Answer:
    """One yes/no from several: any part's evidenced "yes" wins, else a "no".

    Sub-questions ask whether a part of the source shows something, so one
    part that shows it answers yes for the whole; "no" needs no part saying yes.
    LIMITATION: a question whose answer needs the whole source at once ("is X
    mentioned more than Y?") should be planned as a table, not a yes/no.
    """
    stated = [a for a in answers if a.found and a.flag is not None]
    if not stated:
        return Answer(kind="yesno", found=False)
    flag = any(a.flag for a in stated)
    evidence = merge_evidence([a for a in stated if a.flag == flag])
    return Answer(kind="yesno", found=True, flag=flag, evidence=evidence)


def merge_records(answers: list[Answer]) -> Answer:
    """Union of schema records, de-duplicated by where their evidence sits.

    Equal records quoted at distinct places are distinct records (three
    ``user=alice action=login`` lines are three); a record two overlapping
    spans both quoted is kept once. Records without evidence match by content.
    """
    records = _distinct_by_place(
        [list(answer.records) for answer in answers],
        lambda record: record.evidence,
        lambda record: json.dumps(record.data, sort_keys=True, default=str),
    )
    evidence = tuple(r.evidence for r in records if r.evidence)
    return Answer(kind="schema", found=bool(records), records=tuple(records), evidence=evidence)


def join_matches(matches: Iterable[Match], conditions: int) -> Answer:
    """A join answer from matches: the entities that meet every condition.

    Entities match by :func:`~rlm_graph.nodes.types.entity_key` (case and
    spacing ignored); the first spelling in source order is shown. Per entity
    and condition only the first place in the source is kept: the answer needs
    one quote per condition, and the same record seen by two overlapping spans
    (the same place) is then kept once by construction. Entities meeting only
    some conditions stay in ``matches``, so a parent can join them with what
    its other children found. ``items`` are the entities meeting all
    ``conditions``, sorted by name with numbers in order (U2 before U10); each carries its first condition's quote,
    and ``evidence`` holds every kept entity's quotes.
    """
    first: dict[tuple[str, int], Match] = {}
    for match in sorted(matches, key=lambda m: (m.evidence.start, m.evidence.end, m.condition)):
        first.setdefault((entity_key(match.entity), match.condition), match)
    kept = tuple(sorted(first.values(), key=lambda m: (m.evidence.start, m.condition)))
    by_entity: dict[str, list[Match]] = {}
    for match in kept:
        by_entity.setdefault(entity_key(match.entity), []).append(match)
    wanted = set(range(conditions))
    joined = sorted(
        (group for group in by_entity.values() if wanted and {m.condition for m in group} >= wanted),
        key=lambda group: (natural_key(group[0].entity), group[0].entity),
    )
    items = tuple(
        Item(text=group[0].entity, evidence=min(group, key=lambda m: m.condition).evidence)
        for group in joined
    )
    quotes = (m.evidence for group in joined for m in group)
    evidence = tuple(sorted(quotes, key=lambda e: (e.start, e.end)))
    return Answer(kind="join", found=bool(kept), items=items, matches=kept, evidence=evidence)


def natural_key(name: str) -> list[str | int]:
    """A sort key that orders the numbers inside names by value: "U2" < "U10"."""
    parts = re.split(r"(\d+)", entity_key(name))
    return [int(part) if index % 2 else part for index, part in enumerate(parts)]


def merge_join(answers: list[Answer], conditions: int) -> Answer:
    """Join answers of several parts: pool their matches, then keep the
    entities that meet every condition anywhere (:func:`join_matches`)."""
    return join_matches((m for answer in answers for m in answer.matches), conditions)


def short_candidates(answers: list[Answer], question: str) -> list[tuple[int, Answer]]:
    """Distinct short answers, best first, each with its relevance score.

    The same answer (ignoring case, spacing and end punctuation) from several
    spans is one candidate with all their evidence. A candidate's score is the
    most question words any of its evidence sentences holds: an answer copied
    from "The code for the blue door is 41" ranks below one from "The code for
    the red door is 17" when the question asks about the red door. Ties keep
    source order.
    """
    from rlm_graph.nodes.verify import question_overlap

    merged: dict[str, list[Answer]] = {}
    for answer in answers:
        if answer.found and answer.text:
            merged.setdefault(_normal(answer.text), []).append(answer)
    candidates = []
    for group in merged.values():
        evidence = merge_evidence(group)
        score = max((question_overlap(e.quote, question) for e in evidence), default=0)
        candidates.append((score, Answer(kind="short", found=True, text=group[0].text, evidence=evidence)))
    candidates.sort(key=lambda pair: -pair[0])  # stable: source order within a score
    return candidates


def merge_by_code(kind: str, answers: list[Answer], *, conditions: int = 0) -> Answer:
    """Merge answers of any kind but free text.

    Args:
        conditions: how many conditions a ``join`` plan has.

    Raises:
        ValueError: ``kind`` is ``text`` (it needs a model).
    """
    if kind == "join":
        return merge_join(answers, conditions)
    merges = {
        "list": merge_list, "count": merge_count, "table": merge_table,
        "yesno": merge_yesno, "schema": merge_records,
    }
    if kind not in merges:
        msg = f"{kind!r} answers are merged by the root model, not by code"
        raise ValueError(msg)
    return merges[kind](answers)


def dedupe_text(answers: list[Answer]) -> list[Answer]:
    """Drop text answers that repeat earlier ones: the same words, or evidence
    that is all at places already cited (overlapping spans saw the same
    sentences). An answer with any evidence of its own is kept."""
    kept: list[Answer] = []
    for answer in answers:
        cited = [b for other in kept for b in other.evidence]
        same_words = any(_normal(answer.text or "") == _normal(other.text or "") for other in kept)
        nothing_new = bool(answer.evidence) and all(
            any(_overlaps(a, b) for b in cited) for a in answer.evidence
        )
        if not (same_words or nothing_new):
            kept.append(answer)
    return kept


def merge_evidence(answers: list[Answer]) -> tuple[Evidence, ...]:
    """All evidence of some answers, each span once, in source order."""
    seen: dict[tuple[int, int], Evidence] = {}
    for answer in answers:
        for evidence in answer.evidence:
            seen.setdefault((evidence.start, evidence.end), evidence)
    return tuple(sorted(seen.values(), key=lambda e: e.start))


def _distinct_by_place(
    parts: list[list[_T]],
    where: Callable[[_T], Evidence | None],
    content: Callable[[_T], str],
) -> list[_T]:
    """Entries of several parts, each occurrence once.

    An entry is dropped when its evidence quotes again an occurrence an earlier
    part kept (the rule counts use, matched one to one); a part's own entries
    are distinct occurrences (verify places them apart) and are all kept.
    """
    kept: list[_T] = []
    seen = _Occurrences()
    contents: set[str] = set()
    for part in parts:
        matched: set[int] = set()
        fresh: list[Evidence] = []
        for entry in part:
            evidence = where(entry)
            if evidence is None:
                key = _normal(content(entry))
                if key not in contents:
                    contents.add(key)
                    kept.append(entry)
                continue
            twin = seen.find(evidence, exclude=matched)
            if twin is None:
                fresh.append(evidence)
                kept.append(entry)
            else:
                matched.add(twin)
        for evidence in fresh:
            seen.add(evidence)
    return kept


def _sum_distinct(
    parts: Iterable[tuple[int, tuple[Evidence, ...]]],
) -> tuple[int, tuple[Evidence, ...]]:
    """Add counts, minus each occurrence an earlier part already counted; return
    the total and the distinct evidence.

    Two quotes are one occurrence when they overlap by at least half of the
    shorter one (two spans may quote one record with different extents), and
    each earlier quote stands for at most one quote of a later part: a part's
    own quotes are distinct occurrences (verify places them apart), so two of
    them are never both taken for one earlier occurrence.
    """
    total = 0
    seen = _Occurrences()
    for count, evidence in parts:
        matched: set[int] = set()
        fresh = []
        for item in evidence:
            twin = seen.find(item, exclude=matched)
            if twin is None:
                fresh.append(item)
            else:
                matched.add(twin)
        total += max(count - len(matched), 0)
        for item in fresh:
            seen.add(item)
    return total, seen.in_order()


class _Occurrences:
    """Evidence counted so far, searchable by place."""

    def __init__(self) -> None:
        self._items: list[Evidence] = []
        self._starts: list[int] = []
        self._longest = 0

    def find(self, item: Evidence, *, exclude: set[int]) -> int | None:
        """The index of a kept occurrence that ``item`` quotes again, or None.

        Indices stay valid until the next :meth:`add`.
        """
        index = bisect.bisect_left(self._starts, item.end)
        while index > 0 and self._starts[index - 1] > item.start - self._longest:
            index -= 1
            if index not in exclude and _same_occurrence(self._items[index], item):
                return index
        return None

    def add(self, item: Evidence) -> None:
        index = bisect.bisect_right(self._starts, item.start)
        self._starts.insert(index, item.start)
        self._items.insert(index, item)
        self._longest = max(self._longest, item.end - item.start)

    def in_order(self) -> tuple[Evidence, ...]:
        return tuple(self._items)


def _same_occurrence(a: Evidence, b: Evidence) -> bool:
    shared = min(a.end, b.end) - max(a.start, b.start)
    return shared > 0 and 2 * shared >= min(a.end - a.start, b.end - b.start)


def _overlaps(a: Evidence, b: Evidence) -> bool:
    return a.start < b.end and b.start < a.end


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold().strip(".,;:!?\"'`")
