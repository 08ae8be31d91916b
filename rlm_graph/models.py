"""Model access: the one place that talks to LiteLLM.

:class:`ModelClient` wraps a :class:`litellm.Router` whose model groups are the
roles of a run (``root``, ``worker``). It adds what the engine needs around each
call: a global concurrency limit, retries of transient errors with tenacity
(honouring ``Retry-After`` on every attempt), recognition of context-window
errors however the server words them, usage and cost accounting, and a call log
that answers a call already made with the recorded result instead of paying
for it again.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError, ContextWindowError, ModelCallError, StoreError
from rlm_graph.result import Usage
from rlm_graph.tokens import ensure_offline_litellm, token_counter

__all__ = ["CallLog", "Completion", "MemoryCallLog", "ModelClient", "Role", "call_key"]

logger = logging.getLogger(__name__)

Role = Literal["root", "worker"]

MAX_RETRY_WAIT_S = 120.0
# Phrases servers use for "prompt too long" when they do not send a typed error:
# OpenAI, vLLM, llama.cpp server, SGLang, Ollama, Anthropic, Gemini (K05).
_CONTEXT_PATTERNS = re.compile(
    r"context[_ ]length|context window|maximum context|context size|"
    r"exceeds? the (?:model'?s? )?(?:maximum|max|available)|"
    r"prompt is too long|too many tokens|input is too long|"
    r"longer than the model'?s? context|input length .* exceeds|"
    r"n_ctx|requested \d+ tokens",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Completion:
    """One model answer, as the engine sees it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = 0.0
    cost_known: bool = True
    model: str = ""
    refusal: str | None = None
    cached: bool = False


class CallLog(Protocol):
    """Where finished model calls are recorded, keyed by what was sent."""

    async def get(self, key: str) -> Completion | None:
        """Return the recorded completion for ``key``, if any."""
        ...

    async def put(self, key: str, completion: Completion) -> None:
        """Record a completion as soon as it returns (durably, when this returns)."""
        ...


class MemoryCallLog:
    """A call log held in memory: reuse within one process only."""

    def __init__(self) -> None:
        self._entries: dict[str, Completion] = {}

    async def get(self, key: str) -> Completion | None:
        """Return the recorded completion for ``key``, if any."""
        return self._entries.get(key)

    async def put(self, key: str, completion: Completion) -> None:
        """Record a completion."""
        self._entries[key] = completion

    def __len__(self) -> int:
        return len(self._entries)


def call_key(model: str, messages: list[dict[str, str]], params: Mapping[str, Any]) -> str:
    """Return the call-log key of a request: a hash of everything sent."""
    payload = json.dumps(
        {"model": model, "messages": messages, "params": dict(params)},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class ModelClient:
    """Sends the engine's model calls through one LiteLLM Router.

    Args:
        config: the run configuration (models, api base, limits).
        call_log: where finished calls are recorded and looked up.
        on_call: called after every completed or cached call (for progress).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        call_log: CallLog | None = None,
        on_call: Callable[[Role, Completion], None] | None = None,
    ) -> None:
        ensure_offline_litellm()
        import litellm

        self._litellm = litellm
        self.config = config
        self.models: dict[Role, str] = {"root": config.root_model, "worker": config.leaf_model}
        self.usage = Usage()
        self.call_log: CallLog = call_log if call_log is not None else MemoryCallLog()
        self._on_call = on_call
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._priced: dict[str, bool] = {}
        self._counters = {role: token_counter(model) for role, model in self.models.items()}
        for model in set(self.models.values()):
            _check_model_name(litellm, model)
            # Before the Router exists: it registers unknown deployments with a
            # price of 0, which would make every unpriced model look free (K17).
            self._priced[model] = model.startswith("local/") or _has_price(litellm, model)
        self.router = litellm.Router(
            model_list=[self._deployment(role, model) for role, model in self.models.items()],
            num_retries=0,
        )

    def count_tokens(self, role: Role, text: str) -> int:
        """Count tokens of ``text`` with the tokenizer of ``role``'s model."""
        return self._counters[role](text)

    async def complete(
        self,
        role: Role,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        """Send one chat call (or answer it from the call log).

        Args:
            role: which model group answers.
            messages: OpenAI-style chat messages.
            max_tokens: output limit of this call.
            schema: JSON schema the answer must follow (sent as response_format).

        Raises:
            ContextWindowError: the prompt does not fit the model's window.
            ModelCallError: the call failed after retries; ``retryable`` says
                whether a later resume may succeed.
        """
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": self.config.temperature}
        if schema is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": False},
            }
        key = call_key(self.models[role], messages, params)
        recorded = await self.call_log.get(key)
        if recorded is not None:
            completion = _replace(recorded, cached=True)
            self.usage.cached_calls += 1
            self._notify(role, completion)
            return completion

        completion = await self._send_with_retries(role, messages, params, key)
        self._notify(role, completion)

        return completion

    async def _send_with_retries(
        self, role: Role, messages: list[dict[str, str]], params: dict[str, Any], key: str
    ) -> Completion:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=_wait_retry_after,
            retry=retry_if_exception(_is_transient),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._send_once(role, messages, params, key)
        except (ModelCallError, StoreError):
            raise
        except Exception as exc:
            raise self._translate(role, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send_once(
        self, role: Role, messages: list[dict[str, str]], params: dict[str, Any], key: str
    ) -> Completion:
        async with self._semaphore:
            self.usage.calls += 1
            started = time.monotonic()
            # A fresh metadata dict per call: litellm writes into it (STACK-FINDINGS 2).
            response = await asyncio.wait_for(
                self.router.acompletion(model=role, messages=messages, metadata={}, **params),
                timeout=self.config.timeout_s + 5,
            )
            completion = self._completion_from(role, messages, response)
            _raise_if_error_body(response)
            # Recorded before the slot is freed: at any moment at most
            # `concurrency` calls are paid for and not yet in the call log.
            await self.call_log.put(key, completion)
        logger.debug(
            "%s call to %s: %d+%d tokens, %s, %.2f s", role, self.models[role],
            completion.prompt_tokens, completion.completion_tokens,
            completion.finish_reason, time.monotonic() - started,
        )
        self._account(completion)

        return completion

    def _completion_from(
        self, role: Role, messages: list[dict[str, str]], response: Any
    ) -> Completion:
        choice = response.choices[0]
        message = choice.message
        text = message.content or ""
        refusal = getattr(message, "refusal", None)
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        if not prompt_tokens:
            # A response without usage is counted from what was actually sent.
            prompt_tokens = self.count_tokens(role, "\n".join(m["content"] for m in messages))
            completion_tokens = self.count_tokens(role, text)
        cost, known = self._cost(role, response, prompt_tokens, completion_tokens)

        return Completion(
            text=text,
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            cost_known=known,
            model=self.models[role],
            refusal=refusal,
        )

    def _cost(self, role: Role, response: Any, prompt: int, completion: int) -> tuple[float, bool]:
        model = self.models[role]
        if model.startswith("local/"):
            return 0.0, True
        if not self._priced.get(model):
            return 0.0, False
        prompt_cost, completion_cost = self._litellm.cost_per_token(
            model=model, prompt_tokens=prompt, completion_tokens=completion
        )
        return float(prompt_cost + completion_cost), True

    def _account(self, completion: Completion) -> None:
        self.usage.prompt_tokens += completion.prompt_tokens
        self.usage.completion_tokens += completion.completion_tokens
        self.usage.cost_usd += completion.cost_usd
        self.usage.cost_known = self.usage.cost_known and completion.cost_known

    def _notify(self, role: Role, completion: Completion) -> None:
        if self._on_call is not None:
            self._on_call(role, completion)

    def _deployment(self, role: Role, model: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": model,
            "timeout": self.config.timeout_s,
            "max_retries": 0,  # tenacity retries; never let the SDK nest its own
        }
        if self.config.api_base and not model.startswith("local/"):
            params["api_base"] = self.config.api_base
        if self.config.api_key is not None:
            params["api_key"] = self.config.api_key.get_secret_value()
        elif self.config.api_base and model.startswith("openai/") and not self.config.has_openai_key:
            # Local OpenAI-compatible servers rarely check keys, but the OpenAI
            # SDK refuses to send a request without one.
            params["api_key"] = "no-key-needed"
        return {"model_name": role, "litellm_params": params}

    def _translate(self, role: Role, exc: BaseException) -> ModelCallError:
        litellm = self._litellm
        model = self.models[role]
        detail = _short(exc)
        if self.config.api_key is not None and self.config.api_key.get_secret_value():
            detail = detail.replace(self.config.api_key.get_secret_value(), "***")
        if isinstance(exc, litellm.ContextWindowExceededError) or _mentions_context(exc):
            return ContextWindowError(f"{model}: prompt too long for its context window ({detail})")
        if _is_unreachable(exc):
            where = self.config.api_base or "the provider"
            timed_out = isinstance(exc, litellm.Timeout | asyncio.TimeoutError)
            reason = "timed out" if timed_out else "connection failed"
            return ModelCallError(
                f"Cannot reach {where} for model {model} ({reason} after "
                f"{self.config.max_retries + 1} attempts). Check that the server is "
                "running and that --api-base is right.",
                retryable=True,
                # A refused connection fails every call alike; a timeout may be
                # one stalled request, so only the task fails.
                systemic=not timed_out,
            )
        if isinstance(exc, litellm.AuthenticationError):
            return ModelCallError(
                f"{model} rejected the API key ({detail}). Set the provider's key "
                "variable (e.g. OPENAI_API_KEY) or pass --api-key.",
                systemic=True,
            )
        if isinstance(exc, litellm.NotFoundError):
            return ModelCallError(
                f"Model {model} was not found by its server ({detail}).", systemic=True
            )
        retryable = _is_transient(exc)
        return ModelCallError(f"{model} call failed: {detail}", retryable=retryable)


def _check_model_name(litellm: Any, model: str) -> None:
    if model.startswith("local/"):
        from rlm_graph.local import register_local_provider, resolve_gguf

        register_local_provider()
        resolve_gguf(model.removeprefix("local/"))
        return
    from litellm.utils import custom_llm_setup

    custom_llm_setup()
    try:
        litellm.get_llm_provider(model)
    except Exception as exc:
        msg = (
            f"Unknown model '{model}': LiteLLM cannot tell its provider. Use a "
            "provider-prefixed name such as 'openai/NAME' (with --api-base for an "
            "OpenAI-compatible server), 'ollama/NAME', 'hosted_vllm/NAME', or "
            "'local/smollm2-135m' for the embedded model."
        )
        raise ConfigError(msg) from exc


def _has_price(litellm: Any, model: str) -> bool:
    try:
        info = litellm.get_model_info(model)
    except Exception:  # litellm raises a bare Exception for unmapped models
        return False
    return info.get("input_cost_per_token") is not None


def _is_unreachable(exc: BaseException) -> bool:
    import litellm

    if isinstance(exc, litellm.APIConnectionError | litellm.Timeout | asyncio.TimeoutError):
        return True
    # litellm reports a refused connection as an InternalServerError.
    text = str(exc).lower()
    return "connection error" in text or "connection refused" in text


def _is_transient(exc: BaseException) -> bool:
    import litellm

    if isinstance(exc, litellm.ContextWindowExceededError) or _mentions_context(exc):
        return False
    return isinstance(
        exc,
        litellm.RateLimitError
        | litellm.InternalServerError
        | litellm.ServiceUnavailableError
        | litellm.APIConnectionError
        | litellm.Timeout
        | asyncio.TimeoutError,
    )


def _mentions_context(exc: BaseException) -> bool:
    import litellm

    if not isinstance(exc, litellm.BadRequestError | litellm.APIError | ModelCallError):
        return False
    return bool(_CONTEXT_PATTERNS.search(str(exc)))


def _raise_if_error_body(response: Any) -> None:
    """Turn a 200 response that carries an error object into an exception."""
    error = getattr(response, "error", None)
    if error:
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        if _CONTEXT_PATTERNS.search(message):
            raise ContextWindowError(message)
        raise ModelCallError(message)


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Read a server's requested wait from ``Retry-After`` or ``retry-after-ms``.

    Accepts seconds (integer or decimal) and HTTP dates. Negative, empty or
    unparsable values count as absent. The result is clamped to
    :data:`MAX_RETRY_WAIT_S`.
    """
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = -1
        if value >= 0:
            return min(value, MAX_RETRY_WAIT_S)
    raw = (lowered.get("retry-after") or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(raw) if "," in raw else None
        if parsed is None:
            return None
        value = parsed.timestamp() - (now if now is not None else time.time())
        value = max(value, 0.0)
    if value < 0 or value != value:  # negative or NaN: invalid
        return None
    return min(value, MAX_RETRY_WAIT_S)


_backoff = wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=0.5)


def _wait_retry_after(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    headers = _headers_of(exc)
    requested = retry_after_seconds(headers)
    if requested is not None:
        return requested
    return float(_backoff(state))


def _headers_of(exc: BaseException | None) -> Mapping[str, str] | None:
    if exc is None:
        return None
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers:
        return dict(headers)
    return getattr(exc, "litellm_response_headers", None)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.info(
        "model call attempt %d failed (%s); retrying in %.1f s",
        state.attempt_number, _short(exc), wait,
    )


def _short(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split()) if exc is not None else "unknown error"
    text = re.sub(r"(?i)(bearer\s+|api[_-]?key[=: ]+)[^\s,'\"]+", r"\1***", text)
    name = type(exc).__name__ if exc is not None else "Error"
    return f"{name}: {text[:300]}"


def _replace(completion: Completion, **changes: Any) -> Completion:
    values = asdict(completion)
    values.update(changes)
    return Completion(**values)
