"""Merge: combine the children's answers into their parent's answer.

Counts and lists are merged by code, exactly. Neighbouring spans overlap, so
the same occurrence can be reported twice; occurrences are matched by where
their evidence sits in the source, and an item or a counted occurrence seen by
two children is kept once. Free text needs language and is merged by the root
model, in groups of at most ``fan_in`` answers at a time (see
:mod:`rlm_graph.nodes.delegate`, which owns model calls).
"""

from __future__ import annotations

import re

from rlm_graph.nodes.types import Answer, Evidence, Item, Outcome

__all__ = ["dedupe_text", "merge_count", "merge_list", "usable_answers"]


def usable_answers(children: list[Outcome] | tuple[Outcome, ...]) -> list[Answer]:
    """Answers of children that finished and found something, in source order."""
    ordered = sorted(children, key=lambda o: (o.task.start, o.task.end))
    return [o.answer for o in ordered if o.status == "done" and o.answer is not None and o.answer.found]


def merge_list(answers: list[Answer]) -> Answer:
    """Union of list answers: items de-duplicated by name and by evidence span."""
    items: list[Item] = []
    names: set[str] = set()
    spans: set[tuple[int, int]] = set()
    for answer in answers:
        for item in answer.items:
            name = _normal(item.text)
            where = (item.evidence.start, item.evidence.end) if item.evidence else None
            if name in names or (where is not None and where in spans):
                continue
            names.add(name)
            if where is not None:
                spans.add(where)
            items.append(item)

    evidence = tuple(item.evidence for item in items if item.evidence)
    return Answer(kind="list", found=bool(items), items=tuple(items), evidence=evidence)


def merge_count(answers: list[Answer]) -> Answer:
    """Sum of count answers, minus occurrences that two overlapping spans both saw.

    An occurrence is the same when its evidence sits at the same place in the
    source (the same offsets); a set makes this linear in the evidence.
    """
    total = 0
    kept: dict[tuple[int, int], Evidence] = {}
    for answer in answers:
        spans = {(e.start, e.end) for e in answer.evidence}
        duplicates = sum(1 for span in spans if span in kept)
        total += max((answer.count or 0) - duplicates, 0)
        for evidence in answer.evidence:
            kept.setdefault((evidence.start, evidence.end), evidence)

    ordered = tuple(sorted(kept.values(), key=lambda e: e.start))
    return Answer(kind="count", found=total > 0, count=total, evidence=ordered)


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


def _overlaps(a: Evidence, b: Evidence) -> bool:
    return a.start < b.end and b.start < a.end


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold().strip(".,;:!?\"'`")
