"""Chat messages as a run, and a run's result as a chat reply.

The adapters that make rlm-graph look like a chat model (the LangChain chat
model, the LiteLLM provider, ``rlm-graph serve``) all receive a list of
messages and must answer with one message. This module fixes, in one place,
which part of a conversation is the *question* and which is the *source*, and
how a :class:`~rlm_graph.result.Result` reads as text:

- The question is the last user message. Every message before it (system
  prompts, documents pasted earlier, earlier turns) is the source.
- When the conversation is a single user message, its last paragraph (the text
  after the last blank line) is the question and everything above it is the
  source: "<long document>\\n\\n<question>" is how people paste.
- Only text content is read; images and audio are refused with a clear error.

It does not run anything: the adapters call :func:`rlm_graph.arun` with what
:func:`question_from_messages` returns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlm_graph.errors import ConfigError, ModelCallError
from rlm_graph.result import Result

__all__ = ["ChatQuestion", "answer_text", "question_from_messages"]

_LAST_PARAGRAPH = re.compile(r"\n[ \t]*\n(?=\S)")
_QUOTE_CHARS = 120


@dataclass(frozen=True, slots=True)
class ChatQuestion:
    """What a conversation asks, and of which text."""

    question: str
    text: str
    """The source: every message before the question, joined by blank lines."""


def question_from_messages(messages: Sequence[Mapping[str, Any]]) -> ChatQuestion:
    """Split OpenAI-style messages into the question and the source text.

    Args:
        messages: dicts with ``role`` and ``content`` (a string, or a list of
            ``{"type": "text", "text": ...}`` parts).

    Raises:
        ConfigError: no user message, a non-text content part, or nothing to
            read besides the question.
    """
    if not messages:
        msg = "The request has no messages; send at least one user message."
        raise ConfigError(msg)
    texts = [(str(m.get("role", "")), content_text(m.get("content"))) for m in messages]
    last_user = max(
        (i for i, (role, _) in enumerate(texts) if role == "user"), default=None
    )
    if last_user is None:
        msg = "The request has no user message; the last user message is the question."
        raise ConfigError(msg)

    question = texts[last_user][1].strip()
    earlier = [_render(role, text) for role, text in texts[:last_user] if text.strip()]
    if not earlier:
        question, document = _split_single_message(question)
        earlier = [document]
    if not question:
        msg = "The question (the last user message) is empty."
        raise ConfigError(msg)

    return ChatQuestion(question=question, text="\n\n".join(earlier))


def answer_text(result: Result, *, with_citations: bool = True) -> str:
    """Render a result as the text of a chat reply.

    Args:
        result: a finished run.
        with_citations: append the supporting quotes with their line numbers.

    Raises:
        ModelCallError: the run failed (no part of the source could be read);
            a chat reply would otherwise pass an empty answer off as one.
    """
    if result.status == "failed":
        reasons = (
            "; ".join(sorted({f.reason for f in result.failures})) or "no span answered"
        )
        msg = f"The run {result.run_id} failed: {reasons}."
        raise ModelCallError(msg)
    if not result.found or result.answer is None:
        body = "The text does not answer this question."
    elif isinstance(result.answer, list):
        body = "\n".join(f"- {item}" for item in result.answer) or "(none found)"
    else:
        body = str(result.answer)

    lines = [body]
    if with_citations and result.found and result.joined:
        # A join's quotes make sense per entity and condition, not as one list.
        lines.append("\nSources:")
        for joined in result.joined:
            lines.append(f"- {joined.entity}:")
            lines += [
                f'    {condition}: line {c.line}: "{_shorten(c.quote)}"'
                for condition, c in joined.citations.items()
            ]
    elif with_citations and result.found and result.citations:
        lines.append("\nSources:")
        lines += [f'- line {c.line}: "{_shorten(c.quote)}"' for c in result.citations]
    if result.status == "partial":
        lines.append(
            f"\n(Partial answer: {len(result.failures)} part(s) of the text could not be read.)"
        )
    elif result.status == "stopped":
        reason = result.stop_reason or "a budget was reached"
        lines.append(
            f"\n(Partial answer: the run stopped ({reason}); "
            f"{len(result.failures)} part(s) of the text were not read.)"
        )

    return "\n".join(lines)


def content_text(content: Any) -> str:
    """The text of a message's content: a string or a list of text parts.

    Raises:
        ConfigError: a part that is not text (image, audio, file).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                kind = (
                    part.get("type")
                    if isinstance(part, Mapping)
                    else type(part).__name__
                )
                msg = f"Content of type {kind!r} is not supported; rlm-graph reads text only."
                raise ConfigError(msg)
        return "".join(parts)
    msg = f"Message content must be a string or a list of text parts, not {type(content).__name__}."
    raise ConfigError(msg)


def _split_single_message(message: str) -> tuple[str, str]:
    cuts = list(_LAST_PARAGRAPH.finditer(message))
    if not cuts:
        msg = (
            "Nothing to read besides the question. Put the long text in an earlier "
            "message (system or user), or before a blank line followed by the question."
        )
        raise ConfigError(msg)
    cut = cuts[-1]
    return message[cut.end() :].strip(), message[: cut.start()]


def _render(role: str, text: str) -> str:
    if role in ("user", "system", "developer"):
        return text
    return f"{role}: {text}"


def _shorten(quote: str) -> str:
    flat = " ".join(quote.split())
    return flat if len(flat) <= _QUOTE_CHARS else flat[: _QUOTE_CHARS - 1] + "…"
