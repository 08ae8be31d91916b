"""The reading double: a scripted model that answers truthfully from what it is sent.

It plays the model for the evaluation harness at sizes no real model here can
read (up to 10M tokens). It is a double, not a model: for a leaf prompt it
takes the excerpt between the ``<<<`` and ``>>>`` marks and the question, and
answers with the generator's reader applied to *that excerpt only*, so a method
that never sends the needle never gets it back. For a merge prompt it combines
the partial answers it is shown the way a careful model would (it adds numbers
exactly, unions lists, and joins the entities of join partial answers) but,
like a model, it cannot tell which partial answers counted the same record
twice, and it sees only what fits its window. A join leaf prompt is answered
per condition it numbers, with the generator's reader for that condition.
Each reply follows the JSON schema the request asked for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from rlm_graph.eval.generators import Instance, Reading
from rlm_graph.testing import ModelRequest, Reply

__all__ = ["reading_responder"]

_EXCERPT = re.compile(r"<<<\n(.*)\n>>>", re.DOTALL)
_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)
_PARTIAL = re.compile(r"^\[\d+\] (.*)$", re.MULTILINE)
_NOT_STATED = "not stated"


def reading_responder(
    instances: Iterable[Instance],
) -> Callable[[ModelRequest], Reply | str]:
    """A responder for :class:`~rlm_graph.testing.ScriptedModel` that reads.

    Args:
        instances: the tasks whose questions it may be asked; a question it does
            not know is answered "not stated".
    """
    known = {i.question: i for i in instances}
    readers = {question: i.read for question, i in known.items()}

    def respond(request: ModelRequest) -> Reply | str:
        question_match = _QUESTION.search(request.prompt)
        question = question_match.group(1).strip() if question_match else ""
        schema = _schema(request)
        instance = known.get(question)
        joins = instance is not None and instance.kind == "join"
        if "partial answers" in request.prompt:
            if joins:
                return json.dumps({"answer": _merge_join(request.prompt, instance.conditions)})
            return json.dumps({"answer": _merge(request.prompt, question)})
        excerpt = _EXCERPT.search(request.prompt)
        if "matches" in schema.get("properties", {}):
            found = _read_join(request.prompt, excerpt.group(1) if excerpt else "", instance)
            return json.dumps({"matches": found})
        read = readers.get(question)
        reading = read(excerpt.group(1)) if read and excerpt else Reading(None)
        return json.dumps(_format(reading, schema))

    return respond


_CONDITION = re.compile(r"^(\d+)\. (.+)$", re.MULTILINE)


def _read_join(prompt: str, excerpt: str, instance: Instance | None) -> list[dict[str, Any]]:
    """A join leaf: for each condition the prompt numbers (after the excerpt),
    the entities of the excerpt that meet it, by that condition's reader."""
    if instance is None:
        return []
    asked = prompt[prompt.rfind(">>>") :]
    matches = []
    for number, condition in _CONDITION.findall(asked):
        read = instance.condition_readers.get(condition.strip())
        if read is None:
            continue
        reading = read(excerpt)
        for entity, quote in zip(reading.value or [], reading.quotes, strict=False):
            matches.append({"entity": entity, "condition": int(number), "quote": quote})
    return matches


def _merge_join(prompt: str, conditions: tuple[str, ...]) -> str:
    """Join the partial answers shown as a careful model would: an entity is
    listed when the partials shown, taken together, have it meet every
    condition. Partials cut off by the window are not seen."""
    met: dict[str, set[str]] = {}
    for partial in _PARTIAL.findall(prompt):
        for entity, said in re.findall(r"([^;()]+?) \(([^()]*)\)", partial):
            met.setdefault(entity.strip(), set()).update(c for c in conditions if c in said)
    joined = sorted(e for e, seen in met.items() if seen >= set(conditions))
    return "; ".join(joined) if joined else _NOT_STATED


def _schema(request: ModelRequest) -> dict[str, Any]:
    response_format = request.response_format or {}
    inner = response_format.get("json_schema", response_format)
    schema = inner.get("schema", inner) if isinstance(inner, dict) else {}
    return schema if isinstance(schema, dict) else {}


def _format(reading: Reading, schema: dict[str, Any]) -> dict[str, Any]:
    """Put a reading into the shape the request's schema asks for."""
    properties = schema.get("properties", {})
    value, quotes = reading.value, list(reading.quotes)
    if "rows" in properties:
        table = value if isinstance(value, dict) else {}
        return {
            "rows": [
                {
                    "label": label,
                    "count": n,
                    "quotes": [q for q in quotes if f"label: {label} " in q],
                }
                for label, n in table.items()
                if n
            ]
        }
    if "items" in properties:
        items = value if isinstance(value, list) else []
        return {
            "items": [
                {"item": v, "quote": q} for v, q in zip(items, quotes, strict=False)
            ]
        }
    if "count" in properties:
        return {"count": int(value or 0), "quotes": quotes}
    if value is None:
        return {"answer": _NOT_STATED, "quote": ""}
    return {"answer": _render(value), "quote": quotes[0] if quotes else ""}


def _render(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{label}: {n}" for label, n in value.items())
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return str(value)


def _merge(prompt: str, question: str) -> str:
    """Combine partial answers as a careful model would: add counts, union lists,
    keep the first stated fact."""
    partials = [p.strip() for p in _PARTIAL.findall(prompt)]
    stated = [p for p in partials if p and p.casefold() != _NOT_STATED]
    if not stated:
        return _NOT_STATED
    if all(re.fullmatch(r"\d+", p) for p in stated):
        return str(sum(int(p) for p in stated))
    if all(re.fullmatch(r"(\w+: \d+)(, \w+: \d+)*", p) for p in stated):
        totals: dict[str, int] = {}
        for p in stated:
            for label, n in re.findall(r"(\w+): (\d+)", p):
                totals[label] = totals.get(label, 0) + int(n)
        return _render(totals)
    if any(";" in p for p in stated) or "list" in question.casefold():
        items = dict.fromkeys(
            v.strip() for p in stated for v in p.split(";") if v.strip()
        )
        return "; ".join(items)
    return stated[0]
