"""The recursive model as a LiteLLM provider: ``model="rlm/<worker model>"``.

``litellm.completion(model="rlm/openai/gpt-4o-mini", messages=...)`` runs
rlm-graph over the conversation with ``openai/gpt-4o-mini`` reading the spans,
and answers with one assistant message whose usage is the sum over every model
call of the run. Which part of the messages is the question and which the
source is fixed by :mod:`rlm_graph.chat`: the last user message asks, the
messages before it are read (or, for a single message, its last paragraph asks).

A LiteLLM proxy loads the module-level :data:`rlm_provider` from its config::

    litellm_settings:
      custom_provider_map:
        - {"provider": "rlm", "custom_handler": litellm_rlm_graph.provider.rlm_provider}

That instance takes its settings from ``RLM_GRAPH_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from rlm_graph.tokens import ensure_offline_litellm

ensure_offline_litellm()

import litellm  # noqa: E402  (after the offline switches above)
from litellm import CustomLLM  # noqa: E402
from litellm.types.utils import GenericStreamingChunk, ModelResponse, Usage  # noqa: E402
from litellm.utils import custom_llm_setup  # noqa: E402

from rlm_graph import ConfigError, ModelCallError, Result, RunConfig, SourceError, arun  # noqa: E402
from rlm_graph.chat import answer_text, question_from_messages  # noqa: E402

__all__ = ["PROVIDER", "RlmGraphProvider", "register", "rlm_provider"]

logger = logging.getLogger(__name__)

PROVIDER = "rlm"
"""The prefix of model names this provider answers: ``rlm/<worker model>``."""


class RlmGraphProvider(CustomLLM):
    """A LiteLLM custom provider whose answers come from a recursive run.

    Example:
        >>> import litellm
        >>> from litellm_rlm_graph import register
        >>> register(context_window=8192)  # doctest: +SKIP
        >>> litellm.completion(  # doctest: +SKIP
        ...     model="rlm/openai/gpt-4o-mini",
        ...     messages=[{"role": "system", "content": long_text},
        ...               {"role": "user", "content": "Who signed the lease?"}],
        ... ).choices[0].message.content
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        with_citations: bool = True,
        store: str | None = None,
        **settings: Any,
    ) -> None:
        """Create the provider; calls reach it after :func:`register`.

        Args:
            config: settings for every run; None reads ``RLM_GRAPH_*`` variables.
            with_citations: append the supporting quotes to each answer's text.
            store: where runs are recorded (SQLite file or PostgreSQL URL); None:
                ``$RLM_GRAPH_STORE``, else the per-user store.
            **settings: :class:`~rlm_graph.RunConfig` fields overriding ``config``.
                ``model`` (the root model) defaults to the worker model named
                in each call.
        """
        super().__init__()
        self.config = config
        self.settings = settings
        self.with_citations = with_citations
        self.store = store

    def completion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        """Answer a blocking ``litellm.completion`` call; LiteLLM calls this."""
        return _blocking(self.acompletion(model, messages, **kwargs))

    async def acompletion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        """Answer a ``litellm.acompletion`` call; LiteLLM calls this."""
        result = await self._run(model, messages, kwargs)
        response = ModelResponse(
            id=f"chatcmpl-rlm-{uuid.uuid4().hex[:20]}",
            created=int(time.time()),
            model=f"{PROVIDER}/{model}",
            object="chat.completion",
            choices=[
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self._text(result)},
                    "finish_reason": "stop",
                }
            ],
        )
        # ModelResponse declares no usage field; it is set after construction.
        response.usage = _usage(result)  # type: ignore[attr-defined]
        response._hidden_params["rlm_graph"] = result.model_dump(
            mode="json", exclude={"tree"}
        )

        return response

    def streaming(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> Iterator[GenericStreamingChunk]:
        """Answer ``stream=True``: the whole answer arrives as one chunk at the end."""
        yield _blocking(self._chunk(model, messages, kwargs))

    async def astreaming(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> AsyncIterator[GenericStreamingChunk]:
        """Async ``stream=True``: one chunk when the run ends (merge makes it whole)."""
        yield await self._chunk(model, messages, kwargs)

    async def _chunk(
        self, model: str, messages: list[Any], kwargs: dict[str, Any]
    ) -> GenericStreamingChunk:
        result = await self._run(model, messages, kwargs)
        usage = _usage(result)
        return {
            "text": self._text(result),
            "is_finished": True,
            "finish_reason": "stop",
            "index": 0,
            "tool_use": None,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
        }

    async def _run(
        self, model: str, messages: list[Any], kwargs: dict[str, Any]
    ) -> Result:
        settings = self._settings_for(model, kwargs)
        try:
            asked = question_from_messages(messages)
            return await arun(
                asked.question,
                text=asked.text,
                config=self.config,
                store=self.store,
                **settings,
            )
        except (ConfigError, SourceError) as exc:
            raise litellm.BadRequestError(
                str(exc), model=f"{PROVIDER}/{model}", llm_provider=PROVIDER
            ) from exc
        except ModelCallError as exc:
            raise litellm.APIError(
                502, str(exc), llm_provider=PROVIDER, model=f"{PROVIDER}/{model}"
            ) from exc

    def _settings_for(self, model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not model or model.startswith(f"{PROVIDER}/"):
            msg = (
                f"'{PROVIDER}/{model}' names no worker model to recurse with; use "
                f"'{PROVIDER}/<worker model>', e.g. '{PROVIDER}/openai/gpt-4o-mini'."
            )
            raise litellm.BadRequestError(
                msg, model=f"{PROVIDER}/{model}", llm_provider=PROVIDER
            )
        settings = {**self.settings, "worker_model": model}
        root = settings.get("model") or (self.config.model if self.config else None)
        settings["model"] = root or model
        params = kwargs.get("optional_params") or {}
        if params.get("temperature") is not None:
            settings["temperature"] = params["temperature"]
        # api_base/api_key given to litellm.completion are meant for the models
        # the run calls: the rlm provider itself has no server.
        if kwargs.get("api_base"):
            settings["api_base"] = kwargs["api_base"]
        if kwargs.get("api_key"):
            settings["api_key"] = kwargs["api_key"]

        return settings

    def _text(self, result: Result) -> str:
        try:
            return answer_text(result, with_citations=self.with_citations)
        except ModelCallError as exc:
            raise litellm.APIError(
                502,
                str(exc),
                llm_provider=PROVIDER,
                model=result.models.get("worker", ""),
            ) from exc


def register(
    config: RunConfig | None = None,
    *,
    with_citations: bool = True,
    store: str | None = None,
    **settings: Any,
) -> RlmGraphProvider:
    """Make ``litellm.completion(model="rlm/<worker model>", ...)`` reach rlm-graph.

    Replaces an earlier ``rlm`` entry of ``litellm.custom_provider_map`` and keeps
    the others. Arguments are those of :class:`RlmGraphProvider`.

    Returns:
        The registered provider.
    """
    provider = RlmGraphProvider(
        config, with_citations=with_citations, store=store, **settings
    )
    others = [e for e in litellm.custom_provider_map if e["provider"] != PROVIDER]
    litellm.custom_provider_map = [
        *others,
        {"provider": PROVIDER, "custom_handler": provider},
    ]
    # LiteLLM runs this setup on each call; running it now lets a Router built
    # before the first call resolve the provider too.
    custom_llm_setup()  # type: ignore[no-untyped-call]  # untyped upstream

    return provider


def _usage(result: Result) -> Usage:
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
    )


def _blocking(coroutine: Any) -> Any:
    """Run a coroutine from blocking code, even when the caller's thread has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # A blocking litellm.completion() inside async code: run in a fresh thread
    # rather than fail, as LiteLLM's own providers do.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


rlm_provider = RlmGraphProvider()
"""The instance a LiteLLM proxy config names; settings from ``RLM_GRAPH_*``."""
