"""ScriptedModel: an in-process LiteLLM provider that answers from a script.

It owns the LiteLLM side of the doubles: registration in
``litellm.custom_provider_map``, the ``ModelResponse`` it returns and the
LiteLLM exception raised for each :attr:`Reply.error`. It does not stream and
does not serve embeddings.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from types import TracebackType
from typing import Any, Self

import httpx

from rlm_graph.testing._replies import (
    HTTP_ONLY_ERROR_KINDS,
    ModelRequest,
    Reply,
    RequestLog,
    Responder,
    as_reply,
    build_request,
    context_window_message,
    count_tokens,
    explicit_context_message,
)

# Set before the first litellm import so that importing it never reaches for the
# network (STACK-FINDINGS.md, section 1, "Offline behaviour of litellm").
from rlm_graph.tokens import ensure_offline_litellm

ensure_offline_litellm()

import litellm
from litellm.exceptions import (
    AuthenticationError,
    BadRequestError,
    ContextWindowExceededError,
    InternalServerError,
    RateLimitError,
    ServiceUnavailableError,
    Timeout,
)
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import LlmProvidersSet, ModelResponse, Usage
from litellm.utils import custom_llm_setup

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""How long ``Reply(error="timeout")`` hangs when the call passed no timeout."""

_ERROR_STATUS = {
    "rate_limit": 429,
    "server_error": 500,
    "unavailable": 503,
    "bad_request": 400,
    "auth": 401,
    "context_window": 400,
    "timeout": 408,
}

_DEFAULT_ERROR_TEXT = {
    "rate_limit": "Rate limit reached for requests (scripted double).",
    "server_error": "The server had an error while processing your request.",
    "unavailable": "The server is overloaded or not ready yet.",
    "bad_request": "Invalid request (scripted double).",
    "auth": "Incorrect API key provided (scripted double).",
    "timeout": "Request timed out (scripted double).",
}


class ScriptedModel(RequestLog, CustomLLM):
    """An in-process model double reached through ``litellm`` as ``"scripted/..."``.

    Every request is recorded (``requests``, ``calls_per_prompt``,
    ``in_flight``, ``max_in_flight``), checked against ``context_window``, and
    answered by the responder's :class:`Reply`. Each ``Reply.error`` raises the
    matching LiteLLM exception, whose ``response`` carries the status code and
    the reply's headers (``Retry-After`` included). An exception raised by the
    responder itself reaches the caller wrapped by LiteLLM as
    ``litellm.APIConnectionError``. ``Reply(error="timeout")`` sleeps for the
    call's ``timeout`` (LiteLLM's default is 600 s) and then raises
    ``litellm.Timeout``; pass a short ``timeout=`` in tests.

    Example:
        ```python
        with ScriptedModel(sequence("42")) as model:
            response = await litellm.acompletion(
                model="scripted/x", messages=[{"role": "user", "content": "Q?"}]
            )
        assert response.choices[0].message.content == "42"
        assert model.requests[0].prompt == "Q?"
        ```
    """

    def __init__(
        self,
        responder: Responder,
        *,
        context_window: int | None = None,
        provider: str = "scripted",
    ) -> None:
        """Create the double; it is reachable only after :meth:`register`.

        Args:
            responder: Decides the reply for each request.
            context_window: Tokens the double accepts (prompt plus
                ``max_tokens``); None means unlimited.
            provider: The provider prefix in model names (``"<provider>/x"``).

        Raises:
            ValueError: ``provider`` is a built-in LiteLLM provider, which
                LiteLLM would route to its own handler instead of this one.
        """
        if provider in LlmProvidersSet:
            msg = (
                f"Provider name {provider!r} is built into LiteLLM, which would "
                "bypass the double; choose another name, e.g. 'scripted'."
            )
            raise ValueError(msg)
        CustomLLM.__init__(self)
        RequestLog.__init__(self)
        self.responder = responder
        self.context_window = context_window
        self.provider = provider
        self._ids = itertools.count(1)

    def register(self) -> Self:
        """Make ``"<provider>/..."`` models reach this double.

        Replaces an entry of ``litellm.custom_provider_map`` with the same
        provider name and keeps the others.

        Returns:
            The double itself.
        """
        others = [
            entry
            for entry in litellm.custom_provider_map
            if entry["provider"] != self.provider
        ]
        entry = {"provider": self.provider, "custom_handler": self}
        litellm.custom_provider_map = [*others, entry]  # type: ignore[list-item]
        # litellm runs this on every call too; running it now lets a Router
        # built before the first call resolve the provider.
        custom_llm_setup()  # type: ignore[no-untyped-call]  # litellm leaves it untyped

        return self

    def unregister(self) -> None:
        """Remove this double from ``litellm.custom_provider_map``.

        An entry that another double registered under the same name is kept.
        Later calls to ``"<provider>/..."`` fail with
        ``litellm.LiteLLMUnknownProvider`` (a ``BadRequestError``).
        """
        litellm.custom_provider_map = [
            entry
            for entry in litellm.custom_provider_map
            if entry["custom_handler"] is not self
        ]

    def __enter__(self) -> Self:
        return self.register()

    # BaseLLM declares a zero-argument __exit__ (it is never used as a context
    # manager there); ours is the standard protocol.
    def __exit__(  # type: ignore[override]
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unregister()

    def completion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        """Answer one blocking call; LiteLLM calls this, tests do not."""
        request = self._receive(model, messages, kwargs)
        self._enter()
        try:
            reply = self._decide(request)
            time.sleep(reply.latency_s)
            if reply.error == "timeout":
                time.sleep(_timeout_s(kwargs))

            return self._answer(request, reply)
        finally:
            self._leave()

    async def acompletion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        """Answer one async call; LiteLLM calls this, tests do not."""
        request = self._receive(model, messages, kwargs)
        self._enter()
        try:
            reply = self._decide(request)
            await asyncio.sleep(reply.latency_s)
            if reply.error == "timeout":
                await asyncio.sleep(_timeout_s(kwargs))

            return self._answer(request, reply)
        finally:
            self._leave()

    def _receive(
        self, model: str, messages: list[Any], kwargs: dict[str, Any]
    ) -> ModelRequest:
        params = kwargs.get("optional_params") or {}
        max_tokens = params.get("max_tokens", params.get("max_completion_tokens"))
        request = build_request(
            model=model,
            messages=list(messages),
            response_format=params.get("response_format"),
            max_tokens=max_tokens,
            api_key=kwargs.get("api_key"),
        )
        self._record(request)

        return request

    def _decide(self, request: ModelRequest) -> Reply:
        """Reject an over-long request, else ask the responder."""
        too_long = context_window_message(request, self.context_window)
        if too_long is not None:
            raise ContextWindowExceededError(
                message=too_long,
                model=request.model,
                llm_provider=self.provider,
                response=self._http_response(400, {}),
            )

        reply = as_reply(self.responder(request))
        if reply.error in HTTP_ONLY_ERROR_KINDS or reply.error_in_200:
            msg = (
                f"ScriptedModel cannot act out {reply!r}: stall and error_in_200 "
                "need HTTP; use FakeOpenAIServer for them."
            )
            raise ValueError(msg)
        return reply

    def _answer(self, request: ModelRequest, reply: Reply) -> ModelResponse:
        if reply.error is not None:
            raise self._error(request, reply)

        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.message_content,
        }
        if reply.refusal is not None:
            message["refusal"] = reply.refusal
        response = ModelResponse(
            id=f"chatcmpl-{self.provider}-{next(self._ids)}",
            created=int(time.time()),
            model=request.model,
            object="chat.completion",
            choices=[
                {"index": 0, "message": message, "finish_reason": reply.finish_reason}
            ],
        )
        # A fresh ModelResponse has no usage attribute at all; litellm keeps it
        # that way, so include_usage=False really reaches the caller as "none".
        if reply.include_usage:
            completion_tokens = count_tokens(reply.content)
            # ModelResponse sets usage only in __init__ and does not declare it.
            response.usage = Usage(  # type: ignore[attr-defined]
                prompt_tokens=request.prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=request.prompt_tokens + completion_tokens,
            )

        return response

    def _error(self, request: ModelRequest, reply: Reply) -> Exception:
        """Build the LiteLLM exception for ``reply.error``."""
        kind = reply.error or ""
        if kind == "context_window":
            text = reply.error_message or explicit_context_message(request)
        else:
            text = reply.error_message or _DEFAULT_ERROR_TEXT[kind]
        headers = dict(reply.headers)
        if reply.retry_after is not None:
            headers["retry-after"] = reply.retry_after
        response = self._http_response(_ERROR_STATUS[kind], headers)
        model, provider = request.model, self.provider

        if kind == "rate_limit":
            return RateLimitError(text, provider, model, response=response)
        if kind == "server_error":
            return InternalServerError(text, provider, model, response=response)
        if kind == "unavailable":
            return ServiceUnavailableError(text, provider, model, response=response)
        if kind == "bad_request":
            return BadRequestError(text, model, provider, response=response)
        if kind == "auth":
            return AuthenticationError(text, provider, model, response=response)
        if kind == "context_window":
            return ContextWindowExceededError(text, model, provider, response=response)
        return Timeout(text, model, provider, headers=headers, response=response)

    def _http_response(self, status: int, headers: dict[str, str]) -> httpx.Response:
        """A stand-in HTTP response, so exceptions carry status and headers.

        litellm reads Retry-After from ``exc.response.headers`` (see
        ``_get_response_headers`` in litellm's exception_mapping_utils).
        """
        url = f"http://{self.provider}.invalid/v1/chat/completions"
        return httpx.Response(
            status, headers=headers, request=httpx.Request("POST", url)
        )


def _timeout_s(kwargs: dict[str, Any]) -> float:
    """The call's read timeout in seconds (litellm passes 600 s by default)."""
    timeout = kwargs.get("timeout")
    if isinstance(timeout, httpx.Timeout):
        timeout = timeout.read
    if isinstance(timeout, int | float):
        return float(timeout)

    return DEFAULT_TIMEOUT_S
