"""The words sent to models: leaf and merge prompts and their JSON schemas.

Schemas are kept small and flat: grammar-constrained decoding makes even a
135M model produce them, and a quote field comes before the answer so that the
model grounds itself in the text before it answers.
"""

from __future__ import annotations

from typing import Any

from rlm_graph.nodes.types import Kind, Task

__all__ = ["MERGE_SCHEMA", "leaf_messages", "merge_messages", "schema_for"]

QUOTE_MAX_CHARS = 300
ANSWER_MAX_CHARS = 300
LIST_MAX_ITEMS = 40

_SYSTEM = "Answer questions about a text. Use only the text. Reply in JSON."

_INSTRUCTIONS: dict[Kind, str] = {
    "text": (
        "If the text answers the question, give the answer in a few words and "
        "copy the sentence of the text that says it; otherwise answer "
        '"not stated".'
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

MERGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 2 * ANSWER_MAX_CHARS}},
    "required": ["answer"],
}


def schema_for(kind: Kind) -> dict[str, Any]:
    """The JSON schema a leaf reply of this kind must follow."""
    return _SCHEMAS[kind]


def leaf_messages(
    kind: Kind, task: Task, span_text: str, *, feedback: str | None, file_hint: str
) -> list[dict[str, str]]:
    """Messages of a leaf call: the question, the excerpt, and how to reply."""
    user = (
        f"Text (part of {file_hint}):\n<<<\n{span_text}\n>>>\n\n"
        f"Question: {task.question}\n{_INSTRUCTIONS[kind]}"
    )
    if feedback:
        user += f"\n\nYour previous reply was rejected: {feedback}"
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


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
