"""What a model double receives and what it is told to answer.

This module owns the records shared by every double (:class:`ModelRequest`,
:class:`Reply`), the responder helpers (:func:`sequence`, :func:`by_prompt`), the
token count the doubles use, and the bookkeeping both doubles expose for
assertions. It imports neither LiteLLM nor any HTTP code.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlm_graph.tokens import tiktoken_encoding

if TYPE_CHECKING:
    import tiktoken

logger = logging.getLogger(__name__)

ERROR_KINDS = frozenset(
    {
        "rate_limit",
        "server_error",
        "unavailable",
        "bad_request",
        "auth",
        "context_window",
        "timeout",
        "stall",
    }
)
"""The values :attr:`Reply.error` accepts."""

HTTP_ONLY_ERROR_KINDS = frozenset({"stall"})
"""Error kinds only :class:`FakeOpenAIServer` can act out."""

TOKEN_ENCODING = "cl100k_base"


@dataclass(frozen=True)
class ModelRequest:
    """One request as a double received it."""

    model: str
    """Model name as the double saw it, after the provider prefix (``"x"``)."""

    messages: list[dict[str, Any]]
    """The OpenAI-style messages, as received."""

    prompt: str
    """The text of every message content, joined with ``"\\n"``."""

    response_format: dict[str, Any] | None
    """The ``response_format`` parameter, or None when the caller gave none."""

    max_tokens: int | None
    """``max_tokens`` (or ``max_completion_tokens``), or None when not given."""

    prompt_tokens: int
    """Number of cl100k_base tokens in :attr:`prompt`."""

    api_key: str | None
    """The key that arrived; for the HTTP server, the bearer token."""

    received_at: float
    """``time.monotonic()`` when the double received the request."""


@dataclass
class Reply:
    """What the double should do for one request.

    Raises:
        ValueError: ``error`` is not one of :data:`ERROR_KINDS`, or
            ``latency_s`` is negative.
    """

    content: str = ""
    """Text of the assistant message."""

    finish_reason: str = "stop"
    """``"stop"``, ``"length"``, ... sent as given."""

    latency_s: float = 0.0
    """Seconds to wait before answering (or before failing with ``error``)."""

    error: str | None = None
    """None to answer; else one of :data:`ERROR_KINDS`:

    ``"rate_limit"`` (429), ``"server_error"`` (500), ``"unavailable"`` (503),
    ``"bad_request"`` (400), ``"auth"`` (401), ``"context_window"`` (400 with
    OpenAI's context-length wording), ``"timeout"`` (hang until the client gives
    up) and ``"stall"`` (HTTP only: send the headers, never the body).
    """

    error_message: str | None = None
    """Replaces the default error text (for example a vLLM or llama.cpp wording)."""

    retry_after: str | None = None
    """Raw ``Retry-After`` header value: ``"1"``, ``"1.5"`` or an HTTP date."""

    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers, such as ``retry-after-ms``."""

    include_usage: bool = True
    """Whether the completion carries a ``usage`` block."""

    refusal: str | None = None
    """OpenAI-style ``message.refusal``. With an empty ``content`` the message
    content is sent as null, as OpenAI does for refusals."""

    error_in_200: bool = False
    """HTTP only: answer status 200 with an ``{"error": {...}}`` body."""

    def __post_init__(self) -> None:
        if self.error is not None and self.error not in ERROR_KINDS:
            msg = (
                f"Unknown Reply.error {self.error!r}; "
                f"use one of {sorted(ERROR_KINDS)} or None."
            )
            raise ValueError(msg)
        if self.latency_s < 0:
            msg = f"Reply.latency_s must be >= 0 seconds, not {self.latency_s}."
            raise ValueError(msg)

    @property
    def message_content(self) -> str | None:
        """The content to send: None for a refusal without text."""
        if self.refusal is not None and not self.content:
            return None
        return self.content


Responder = Callable[[ModelRequest], Reply | str]
"""Decides the reply for a request; a plain ``str`` means ``Reply(content=it)``."""


def sequence(*replies: Reply | str) -> Responder:
    """Build a responder that returns ``replies`` in order, then repeats the last.

    The responder is thread-safe, so it can serve :class:`FakeOpenAIServer`.

    Args:
        *replies: At least one reply; a plain ``str`` means ``Reply(content=it)``.

    Returns:
        A responder that ignores the request and counts its calls.

    Raises:
        ValueError: No reply was given.
    """
    if not replies:
        msg = "sequence() needs at least one reply, e.g. sequence('ok')."
        raise ValueError(msg)

    lock = threading.Lock()
    position = 0

    def respond(request: ModelRequest) -> Reply | str:
        nonlocal position
        with lock:
            reply = replies[min(position, len(replies) - 1)]
            position += 1
        return reply

    return respond


def by_prompt(
    rules: Mapping[str, Reply | str] | Callable[[str], Reply | str | None],
    default: Reply | str | None = None,
) -> Responder:
    """Build a responder that picks the reply from the prompt text.

    Args:
        rules: Either a mapping from a substring to its reply, tried in insertion
            order (the first substring found in the prompt wins), or a function
            of the prompt returning a reply or None for "no rule".
        default: The reply when no rule matches. None means "no default".

    Returns:
        A responder for either double.

    Raises:
        LookupError: At call time, when no rule matches and there is no default.
            ScriptedModel lets it propagate (LiteLLM wraps it);
            FakeOpenAIServer answers HTTP 500 with its message.
    """
    choose = _substring_rules(rules) if isinstance(rules, Mapping) else rules

    def respond(request: ModelRequest) -> Reply | str:
        reply = choose(request.prompt)
        if reply is not None:
            return reply
        if default is not None:
            return default
        msg = (
            f"by_prompt: no rule matched the prompt {request.prompt[:80]!r}; "
            "add a rule or pass default=."
        )
        raise LookupError(msg)

    return respond


def prompt_digest(prompt: str) -> str:
    """Return the key of ``prompt`` in a double's ``calls_per_prompt`` counter.

    Args:
        prompt: The prompt text (message contents joined with ``"\\n"``).

    Returns:
        The hex SHA-256 of the UTF-8 prompt.
    """
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def count_tokens(text: str) -> int:
    """Count the cl100k_base tokens of ``text``, offline.

    Args:
        text: Any text; special-token markers are counted as plain text.

    Returns:
        The number of tokens.
    """
    return len(_encoding().encode(text, disallowed_special=()))


def build_request(
    *,
    model: str,
    messages: list[dict[str, Any]],
    response_format: dict[str, Any] | None,
    max_tokens: int | None,
    api_key: str | None,
) -> ModelRequest:
    """Make the :class:`ModelRequest` record of one received request."""
    received_at = time.monotonic()
    prompt = "\n".join(_content_text(m.get("content")) for m in messages)

    return ModelRequest(
        model=model,
        messages=messages,
        prompt=prompt,
        response_format=response_format,
        max_tokens=max_tokens,
        prompt_tokens=count_tokens(prompt),
        api_key=api_key,
        received_at=received_at,
    )


def as_reply(answer: Reply | str) -> Reply:
    """Turn a responder's answer into a :class:`Reply`.

    Raises:
        TypeError: The responder returned something else.
    """
    if isinstance(answer, Reply):
        return answer
    if isinstance(answer, str):
        return Reply(content=answer)
    msg = f"A responder must return Reply or str, not {type(answer).__name__}."
    raise TypeError(msg)


def context_window_message(
    request: ModelRequest, context_window: int | None
) -> str | None:
    """Say why ``request`` does not fit ``context_window``, or None when it fits.

    The wording is OpenAI's, which LiteLLM recognises as a context-window error.
    """
    if context_window is None:
        return None
    completion = request.max_tokens or 0
    requested = request.prompt_tokens + completion
    if requested <= context_window:
        return None

    return (
        f"This model's maximum context length is {context_window} tokens. "
        f"However, you requested {requested} tokens ({request.prompt_tokens} in "
        f"the messages, {completion} in the completion). Please reduce the "
        "length of the messages or completion."
    )


def explicit_context_message(request: ModelRequest) -> str:
    """Default text for ``Reply(error="context_window")`` on an unlimited double."""
    completion = request.max_tokens or 0
    return (
        "This model's maximum context length is exceeded. However, you requested "
        f"{request.prompt_tokens + completion} tokens ({request.prompt_tokens} in "
        f"the messages, {completion} in the completion). Please reduce the "
        "length of the messages or completion."
    )


class RequestLog:
    """Thread-safe record of the requests a double received.

    Both doubles inherit it; its public attributes are the ones tests assert on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[ModelRequest] = []
        """Every request received, in arrival order (rejected ones too)."""
        self.calls_per_prompt: Counter[str] = Counter()
        """Requests per prompt, keyed by :func:`prompt_digest` of the prompt."""
        self.in_flight = 0
        """Requests being handled right now (latency included)."""
        self.max_in_flight = 0
        """The highest :attr:`in_flight` seen since creation or :meth:`reset`."""

    def reset(self) -> None:
        """Forget every recorded request and zero the counters.

        ``in_flight`` keeps counting requests still being handled.
        """
        with self._lock:
            self.requests = []
            self.calls_per_prompt = Counter()
            self.max_in_flight = self.in_flight

    def _record(self, request: ModelRequest) -> None:
        with self._lock:
            self.requests.append(request)
            self.calls_per_prompt[prompt_digest(request.prompt)] += 1
        logger.debug(
            "%s received model=%r prompt_tokens=%d",
            type(self).__name__,
            request.model,
            request.prompt_tokens,
        )

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _substring_rules(
    rules: Mapping[str, Reply | str],
) -> Callable[[str], Reply | str | None]:
    items = list(rules.items())

    def choose(prompt: str) -> Reply | str | None:
        return next((reply for key, reply in items if key in prompt), None)

    return choose


def _content_text(content: object) -> str:
    """Text of one message content: a string, a list of parts, or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(str(p) for p in parts)
    return str(content)


def _encoding() -> tiktoken.Encoding:
    return tiktoken_encoding(TOKEN_ENCODING)
