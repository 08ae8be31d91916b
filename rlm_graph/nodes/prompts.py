"""The words sent to models: leaf and merge prompts and their JSON schemas.

Schemas are kept small and flat: grammar-constrained decoding makes even a
135M model produce them, and a quote field comes before the answer so that the
model grounds itself in the text before it answers.
"""

from __future__ import annotations

from typing import Any

from rlm_graph.nodes.types import Kind, Task

__all__ = [
    "JOIN_MAX_MATCHES",
    "JUDGE_SCHEMA",
    "MAX_CONDITIONS",
    "MERGE_SCHEMA",
    "NONE_OF_THEM",
    "choice_schema",
    "choose_messages",
    "judge_messages",
    "leaf_messages",
    "merge_messages",
    "schema_for",
]

QUOTE_MAX_CHARS = 300
ANSWER_MAX_CHARS = 300
LIST_MAX_ITEMS = 40
SHORT_ANSWER_MAX_CHARS = 120
SHORT_ANSWER_PATTERN = rf'^[^{{}}"\\\x00-\x1F]{{1,{SHORT_ANSWER_MAX_CHARS}}}$'

_SYSTEM = "Answer questions about a text. Use only the text. Reply in JSON."

_INSTRUCTIONS: dict[Kind, str] = {
    "text": (
        "If the text answers the question, give the answer in a few words and "
        "copy the sentence of the text that says it; otherwise answer "
        '"not stated".'
    ),
    "short": (
        "Copy from the text the words that answer the question (a name, a number, "
        "a time or a short phrase), exactly as written. If the text does not say, "
        'answer "not stated".'
    ),
    "list": (
        'Reply as {"items": [{"item": "<one item>", "quote": "<words copied exactly '
        'from the excerpt that mention it>"}]}. Use an empty list if the excerpt '
        "has none."
    ),
    "count": (
        'Reply as {"count": <number found in this excerpt>, "quotes": ["<words '
        'copied exactly from the excerpt for each one>"]}. Count only what is in '
        "this excerpt; 0 if none."
    ),
    "table": (
        'Reply as {"rows": [{"label": "<label>", "count": <number in this '
        'excerpt>, "quotes": ["<words copied exactly from the excerpt for each '
        'one>"]}]}, one row per label found. Count only what is in this excerpt; '
        "an empty list if none."
    ),
    "yesno": (
        'Reply as {"answer": "yes" or "no" or "not stated", "quote": "<the '
        'sentence copied exactly from the excerpt that shows it>"}. Answer "not '
        'stated" if the excerpt does not say.'
    ),
    "schema": (
        'Reply as {"records": [...]}: one record for each thing the question asks '
        "for that this excerpt contains, with every field filled from the excerpt "
        'and "quote": words copied exactly from the excerpt. An empty list if none.'
    ),
    # The conditions and the entity noun are filled in by leaf_messages.
    "join": (
        "Check each condition on its own: for each one, find every {one} in this "
        "excerpt that meets it, even if it meets no other condition here (other parts "
        'of the text are read separately). Reply as {{"matches": [{{"entity": "<the '
        '{one} exactly as written in the excerpt>", "condition": <the condition\'s '
        'number>, "quote": "<words copied exactly from the excerpt that show it and '
        'name the {one}>"}}]}}: one entry per {one} and condition met. An empty list '
        "if none."
    ),
}

_QUOTE = {"type": "string", "maxLength": QUOTE_MAX_CHARS}
_SCHEMAS: dict[Kind, dict[str, Any]] = {
    # The answer comes first: measured with SmolLM2-135M, asking for a quote or a
    # relevance flag first made it copy the instructions instead of answering.
    "text": {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": ANSWER_MAX_CHARS},
            "quote": _QUOTE,
        },
        "required": ["answer", "quote"],
    },
    # One field, copied from the text; code finds it and its sentence. Braces and
    # quote marks are kept out: SmolLM2-135M ended 4 of 16 answers with " }"
    # inside the string and ran on (benchmarks/embedded_leaf.py).
    "short": {
        "type": "object",
        "properties": {"answer": {"type": "string", "pattern": SHORT_ANSWER_PATTERN}},
        "required": ["answer"],
    },
    "list": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": LIST_MAX_ITEMS,
                "items": {
                    "type": "object",
                    "properties": {"item": {"type": "string", "maxLength": 200}, "quote": _QUOTE},
                    "required": ["item", "quote"],
                },
            }
        },
        "required": ["items"],
    },
    "count": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 0},
            "quotes": {"type": "array", "maxItems": LIST_MAX_ITEMS, "items": _QUOTE},
        },
        "required": ["count", "quotes"],
    },
}

_SCHEMAS["table"] = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "maxItems": LIST_MAX_ITEMS,
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 100},
                    "count": {"type": "integer", "minimum": 0},
                    "quotes": {"type": "array", "maxItems": LIST_MAX_ITEMS, "items": _QUOTE},
                },
                "required": ["label", "count", "quotes"],
            },
        }
    },
    "required": ["rows"],
}
_SCHEMAS["yesno"] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "not stated"]},
        "quote": _QUOTE,
    },
    "required": ["answer", "quote"],
}

MAX_CONDITIONS = 6
"""Most conditions a join question may have."""
JOIN_MAX_MATCHES = 2 * LIST_MAX_ITEMS
"""Most matches one join reply may list (each entity may meet several conditions)."""


def _join_schema(conditions: int) -> dict[str, Any]:
    number: dict[str, Any] = {"type": "integer", "minimum": 1}
    if conditions:
        number["maximum"] = conditions
    return {
        "type": "object",
        "properties": {
            "matches": {
                "type": "array",
                "maxItems": JOIN_MAX_MATCHES,
                "items": {
                    "type": "object",
                    "properties": {
                        "entity": {"type": "string", "maxLength": 200},
                        "condition": number,
                        "quote": _QUOTE,
                    },
                    "required": ["entity", "condition", "quote"],
                },
            }
        },
        "required": ["matches"],
    }


MERGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 2 * ANSWER_MAX_CHARS}},
    "required": ["answer"],
}


def schema_for(
    kind: Kind, record_schema: dict[str, Any] | None = None, *, conditions: int = 0
) -> dict[str, Any]:
    """The JSON schema a leaf reply of this kind must follow.

    Args:
        kind: the answer kind.
        record_schema: for the ``schema`` kind, the user's schema of one record;
            each record gets an evidence field added (:func:`evidence_field`).
            The record is nested under ``records``, so its ``$defs`` (and
            ``definitions``) move to the top and its other local ``$ref``s are
            re-pointed to where the record now sits.
        conditions: for the ``join`` kind, how many conditions there are (the
            highest condition number a match may give; 0: not bounded).
    """
    if kind == "join":
        return _join_schema(conditions)
    if kind != "schema":
        return _SCHEMAS[kind]
    field = evidence_field(record_schema)
    given = record_schema or {"type": "object"}
    record = {k: v for k, v in given.items() if k not in _DROPPED}
    definitions = {k: record.pop(k) for k in _DEFINITIONS if k in record}
    record = _rebase_refs(record, _RECORD_POINTER)
    record["properties"] = {**record.get("properties", {}), field: _QUOTE}
    record["required"] = [*record.get("required", []), field]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"records": {"type": "array", "maxItems": LIST_MAX_ITEMS, "items": record}},
        "required": ["records"],
    }
    # pydantic puts nested models under $defs; "#/$defs/..." refs resolve at the root.
    schema.update(_rebase_refs(definitions, _RECORD_POINTER))
    return schema


_DROPPED = ("$schema", "$id", "title")
_DEFINITIONS = ("$defs", "definitions")
_RECORD_POINTER = "/properties/records/items"
_LITERAL_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
"""Keywords whose values are data, not schemas (a "$ref" in them refers to nothing)."""
_NAMED_KEYWORDS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
"""Keywords whose keys are names (of fields, definitions), not keywords."""


def _rebase_refs(node: Any, prefix: str, *, named: bool = False) -> Any:
    """Copy of a schema whose local refs into the record point under ``prefix``;
    refs into ``$defs``/``definitions`` stay (those move to the top).

    Args:
        named: ``node`` maps names to schemas (``properties``, ``$defs`` ...).
    """
    if isinstance(node, list):
        return [_rebase_refs(item, prefix) for item in node]
    if not isinstance(node, dict):
        return node
    if named:
        return {name: _rebase_refs(value, prefix) for name, value in node.items()}
    rebased: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            pointer = value[1:]
            top = pointer.split("/")[1] if pointer.startswith("/") else ""
            rebased[key] = value if top in _DEFINITIONS else f"#{prefix}{pointer}"
        elif key in _LITERAL_KEYWORDS:
            rebased[key] = value
        else:
            rebased[key] = _rebase_refs(value, prefix, named=key in _NAMED_KEYWORDS)
    return rebased


def evidence_field(record_schema: dict[str, Any] | None) -> str:
    """The name of the field that carries a record's evidence quote.

    ``quote`` unless the user's record already has a field of that name; then
    the first of ``source_quote``, ``source_quote_2``, ... that it does not have,
    so a user's field is never taken for ours nor dropped.
    """
    taken = set((record_schema or {}).get("properties") or {})
    if "quote" not in taken:
        return "quote"
    name, number = "source_quote", 1
    while name in taken:
        number += 1
        name = f"source_quote_{number}"
    return name


def leaf_messages(
    kind: Kind,
    task: Task,
    span_text: str,
    *,
    feedback: str | None,
    file_hint: str,
    record_schema: dict[str, Any] | None = None,
    conditions: tuple[str, ...] = (),
    entity: str | None = None,
) -> list[dict[str, str]]:
    """Messages of a leaf call: the question, the excerpt, and how to reply.

    A ``join`` leaf is shown the numbered ``conditions`` and asked which
    ``entity`` (a plural noun, "users") in the excerpt meets each.
    """
    how = _INSTRUCTIONS[kind]
    if kind == "join":
        many = entity or "entities"
        numbered = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(conditions))
        how = f"Conditions:\n{numbered}\n" + how.format(entity=many, one=_singular(many))
    if kind == "schema" and record_schema:
        field = evidence_field(record_schema)
        fields = ", ".join(record_schema.get("properties", {}))
        how = how.replace('"quote"', f'"{field}"')
        how += f" Fields of a record: {fields}, {field}."
    user = (
        f"Text (part of {file_hint}):\n<<<\n{span_text}\n>>>\n\n"
        f"Question: {task.question}\n{how}"
    )
    if feedback:
        user += f"\n\nYour previous reply was rejected: {feedback}"
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def _singular(noun: str) -> str:
    """A rough singular of a plural noun, for the prompt's wording only."""
    words = noun.split()
    if not words:
        return "entity"
    last = words[-1]
    lower = last.casefold()
    if lower.endswith("ies") and len(last) > 4:
        last = last[:-3] + "y"
    elif lower.endswith(("sses", "xes", "ches", "shes")):
        last = last[:-2]
    elif lower.endswith("s") and not lower.endswith("ss"):
        last = last[:-1]
    return " ".join([*words[:-1], last])


def merge_messages(question: str, partials: list[str]) -> list[dict[str, str]]:
    """Messages of a free-text merge call over the answers of several pieces."""
    numbered = "\n".join(f"[{i + 1}] {text}" for i, text in enumerate(partials))
    user = (
        f"Question: {question}\n\n"
        "Different parts of a long document gave these partial answers, in "
        f"document order:\n{numbered}\n\n"
        "Combine them into one answer to the question. Keep every fact that "
        "answers it; drop repetition. Do not comment on the task itself. "
        'Reply as {"answer": "<the combined answer>"}.'
    )
    return [
        {"role": "system", "content": "You combine partial answers. Reply with JSON only."},
        {"role": "user", "content": user},
    ]


NONE_OF_THEM = "none of them"


def choose_messages(question: str, candidates: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Messages of a choice among short answers found in different places,
    each shown with the sentence it was copied from."""
    listed = "\n".join(f'- {answer} (from: "{sentence}")' for answer, sentence in candidates)
    user = (
        f"Question: {question}\n\nDifferent parts of a long document gave these "
        f"answers:\n{listed}\n\nWhich answer does the question ask for? Reply as "
        '{"answer": "<one of the answers>"}, or "none of them".'
    )
    return [
        {"role": "system", "content": "You choose the answer that fits the question. Reply with JSON only."},
        {"role": "user", "content": user},
    ]


def choice_schema(answers: list[str]) -> dict[str, Any]:
    """A reply that must be one of ``answers`` or :data:`NONE_OF_THEM`."""
    return {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": [*answers, NONE_OF_THEM]}},
        "required": ["answer"],
    }


JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "supported": {"type": "boolean"},
        "reason": {"type": "string", "maxLength": 300},
    },
    "required": ["supported", "reason"],
}


def judge_messages(question: str, span_text: str, answer: str) -> list[dict[str, str]]:
    """Messages of a judge call: is this answer supported by this excerpt?"""
    user = (
        f"Text:\n<<<\n{span_text}\n>>>\n\nQuestion: {question}\n"
        f"Proposed answer, from this text only: {answer}\n\n"
        "Is the proposed answer correct and supported by the text? If not, say "
        'what is wrong in one sentence. Reply as {"supported": true or false, '
        '"reason": "<why>"}.'
    )
    return [
        {"role": "system", "content": "You check answers against a text. Reply with JSON only."},
        {"role": "user", "content": user},
    ]
