"""The reading double: a scripted model that answers truthfully from what it is sent.

It plays the model for the evaluation harness at sizes no real model here can
read (up to 10M tokens). It is a double, not a model: for a leaf prompt it
takes the excerpt between the ``<<<`` and ``>>>`` marks and the question, and
answers with the generator's reader applied to *that excerpt only*, so a method
that never sends the needle never gets it back. For a merge prompt it combines
the partial answers it is shown the way a careful model would (it adds numbers
exactly and unions lists) but, like a model, it cannot tell which partial
answers counted the same record twice, and it sees only what fits its window.
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
    readers = {i.question: i.read for i in instances}

    def respond(request: ModelRequest) -> Reply | str:
        question_match = _QUESTION.search(request.prompt)
        question = question_match.group(1).strip() if question_match else ""
        schema = _schema(request)
        if "partial answers" in request.prompt:
            return json.dumps({"answer": _merge(request.prompt, question)})
        excerpt = _EXCERPT.search(request.prompt)
        read = readers.get(question)
        reading = read(excerpt.group(1)) if read and excerpt else Reading(None)
        return json.dumps(_format(reading, schema))

    return respond


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
