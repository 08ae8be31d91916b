"""An OpenAI-compatible HTTP endpoint over rlm-graph (``rlm-graph serve``).

Any OpenAI client, in any language, can then ask questions over texts far
larger than a model's window: ``POST /v1/chat/completions`` runs the recursion
over the conversation (see :mod:`rlm_graph.chat` for which part is the question
and which the source) and answers with one assistant message, usage summed over
every model call of the run, and an ``rlm_graph`` field with the run id, status
and citations. ``GET /v1/models`` lists the one model served,
``rlm/<worker model>``.

Guards: loopback by default (another host needs a bearer token), an optional
bearer token, a request size limit, and JSON 4xx errors in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) for every bad request.

The server is aiohttp's (already installed with LiteLLM); docs/design.md
(section "serve") has the choice and its measurements. Runs share the server's
event loop: LiteLLM keeps per-loop state (its logging worker) that broke when
each run had a loop of its own in a thread (benchmarks/serve_overhead.py).

Streaming (``"stream": true``) is answered as server-sent events in OpenAI's
chunk format, but the answer arrives as one chunk when the run ends: the merge
step produces it whole. Until then the stream carries SSE comments every few
seconds, so that proxies do not drop an idle connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from rlm_graph.api import arun
from rlm_graph.chat import answer_text, question_from_messages
from rlm_graph.config import RunConfig
from rlm_graph.errors import ConfigError, ModelCallError, RlmGraphError, SourceError
from rlm_graph.result import Result

__all__ = [
    "ServeSettings",
    "check_config",
    "create_app",
    "serve",
    "serve_in_thread",
    "served_model_id",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
KEEPALIVE_INTERVAL_S = 5.0

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServeSettings(BaseModel):
    """How ``rlm-graph serve`` listens and whom it lets in."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    host: str = DEFAULT_HOST
    """Address to bind. Anything but loopback requires ``token``."""
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """TCP port; 0 picks a free one."""
    token: SecretStr | None = None
    """Bearer token every request must carry; None lets any local client in."""
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1024)
    """Largest request body accepted; larger ones get 413."""
    max_runs: int = Field(default=2, ge=1, le=1024)
    """Runs at once; more requests wait their turn (each run already calls
    models concurrently, up to the run's ``concurrency``)."""
    with_citations: bool = True
    """Append the supporting quotes to each answer's text."""
    store: str | None = None
    """Where runs are recorded (a SQLite file or a PostgreSQL URL); None:
    ``$RLM_GRAPH_STORE``, else the per-user store. The run id in each reply's
    ``rlm_graph`` field names the run there (``rlm-graph show``/``resume``)."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Any] | None = None


class _ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    n: int = Field(default=1, ge=1, le=1)


def served_model_id(config: RunConfig) -> str:
    """The model name clients send: ``rlm/`` and the worker model (with a
    router config: the name of the group that plays the worker role).

    Raises:
        ConfigError: the router config cannot be used.
    """
    if config.router_config is None:
        return f"rlm/{config.leaf_model}"
    from rlm_graph.models import ModelClient

    return f"rlm/{ModelClient(config).table.roles['worker']}"


def check_config(config: RunConfig) -> None:
    """Refuse settings every request would fail with, before serving any.

    Builds the model client a run builds: unknown models, an unusable router
    config, or a cost budget without prices raise here.

    Raises:
        ConfigError: what is wrong and how to fix it.
    """
    from rlm_graph.models import ModelClient

    ModelClient(config)


def create_app(
    config: RunConfig, settings: ServeSettings | None = None
) -> web.Application:
    """Build the aiohttp application; run it with :func:`serve`.

    Raises:
        ConfigError: a non-loopback host without a token.
    """
    settings = settings or ServeSettings()
    _check_exposure(settings)
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[_json_errors, _make_auth(settings.token)],
    )
    endpoint = _Endpoint(config, settings)
    app.router.add_get("/v1/models", endpoint.models)
    app.router.add_post("/v1/chat/completions", endpoint.chat_completions)

    return app


SHUTDOWN_GRACE_S = 5.0
"""How long a stopping server waits for requests in flight."""


async def serve(
    config: RunConfig,
    settings: ServeSettings | None = None,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until cancelled.

    Args:
        on_ready: called with the base URL (``http://host:port/v1``) once listening.
    """
    settings = settings or ServeSettings()
    await asyncio.to_thread(check_config, config)
    # On Ctrl-C, requests in flight get a few seconds, not aiohttp's default 60:
    # an idle keep-alive connection held the process open for the full minute.
    # handler_cancellation: a client that disconnects cancels its request's
    # handler, and with it the run (calls already returned stay in the call
    # log; the run is recorded as interrupted). aiohttp's default lets a run
    # nobody waits for go on spending.
    runner = web.AppRunner(
        create_app(config, settings),
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        handler_cancellation=True,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        url = _base_url(settings.host, runner)
        logger.info("serving %s at %s", served_model_id(config), url)
        if on_ready is not None:
            on_ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@contextmanager
def serve_in_thread(
    config: RunConfig,
    settings: ServeSettings | None = None,
    *,
    start_timeout_s: float = 30.0,
) -> Iterator[str]:
    """Serve from a background thread for the ``with`` block; yields the base URL.

    For tests, examples and notebooks. The server stops when the block ends.

    Raises:
        ConfigError: bad settings (see :func:`create_app`).
        RlmGraphError: the server did not start in time.
    """
    ready = threading.Event()
    urls: list[str] = []
    failures: list[BaseException] = []
    control: dict[str, Any] = {}

    def on_ready(url: str) -> None:
        urls.append(url)
        ready.set()

    async def until_stopped() -> None:
        stop = asyncio.Event()
        control.update(loop=asyncio.get_running_loop(), stop=stop)
        server = asyncio.ensure_future(serve(config, settings, on_ready=on_ready))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if server.done():
            server.result()  # raises what stopped the server
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server

    def main() -> None:
        # asyncio.run also ends the tasks LiteLLM starts on this loop.
        try:
            asyncio.run(until_stopped())
        except BaseException as exc:  # handed to the caller below
            failures.append(exc)
            ready.set()

    thread = threading.Thread(target=main, name="rlm-graph-serve", daemon=True)
    thread.start()
    ready.wait(start_timeout_s)
    if failures:
        raise failures[0]
    if not urls:
        msg = f"rlm-graph serve did not start within {start_timeout_s:.0f} s."
        raise RlmGraphError(msg)
    try:
        yield urls[0]
    finally:
        control["loop"].call_soon_threadsafe(control["stop"].set)
        thread.join(start_timeout_s)


class _Endpoint:
    """The request handlers, sharing the run configuration and a run limit."""

    def __init__(self, config: RunConfig, settings: ServeSettings) -> None:
        self.config = config
        self.settings = settings
        self.model_id = served_model_id(config)
        self.created = int(time.time())
        self.runs = asyncio.Semaphore(settings.max_runs)

    async def models(self, request: web.Request) -> web.Response:
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "rlm-graph",
        }
        return web.json_response({"object": "list", "data": [entry]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request, self.settings.max_request_bytes)
        try:
            chat = _ChatRequest.model_validate(body)
        except ValidationError as exc:
            raise _bad_request(_first_problem(exc), param=_first_param(exc)) from exc
        if chat.model != self.model_id:
            msg = f"Model {chat.model!r} is not served here; use {self.model_id!r} (GET /v1/models)."
            raise _error(
                404,
                msg,
                kind="invalid_request_error",
                code="model_not_found",
                param="model",
            )
        try:
            asked = question_from_messages([m.model_dump() for m in chat.messages])
        except ConfigError as exc:
            raise _bad_request(str(exc), param="messages") from exc

        settings = (
            {"temperature": chat.temperature} if chat.temperature is not None else {}
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if chat.stream:
            return await self._stream(
                request, chat, completion_id, asked.question, asked.text, settings
            )
        result = await self._run(asked.question, asked.text, settings)

        return web.json_response(self._completion(completion_id, result))

    async def _run(self, question: str, text: str, settings: dict[str, Any]) -> Result:
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        async with self.runs:
            try:
                return await arun(
                    question,
                    text=text,
                    config=self.config,
                    store=self.settings.store,
                    run_id=run_id,
                    **settings,
                )
            except asyncio.CancelledError:
                logger.info(
                    "the client went away: run %s stopped; its finished calls are "
                    "kept and answer the same request again",
                    run_id,
                )
                raise
            except (ConfigError, SourceError) as exc:
                raise _bad_request(str(exc)) from exc
            except ModelCallError as exc:
                logger.warning("a run failed: %s", exc)
                raise _error(
                    502, str(exc), kind="upstream_error", code="model_error"
                ) from exc

    def _completion(self, completion_id: str, result: Result) -> dict[str, Any]:
        content = self._content(result)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(result),
            "rlm_graph": _extension(result),
        }

    def _content(self, result: Result) -> str:
        try:
            return answer_text(result, with_citations=self.settings.with_citations)
        except ModelCallError as exc:
            raise _error(
                502, str(exc), kind="upstream_error", code="run_failed"
            ) from exc

    async def _stream(
        self,
        request: web.Request,
        chat: _ChatRequest,
        completion_id: str,
        question: str,
        text: str,
        settings: dict[str, Any],
    ) -> web.StreamResponse:
        # Start the run before answering 200, so that errors found before any
        # model call (a bad setting, an empty source) still come back as 4xx.
        run_task = asyncio.ensure_future(self._run(question, text, settings))
        try:
            done, _ = await asyncio.wait({run_task}, timeout=KEEPALIVE_INTERVAL_S)
            if run_task in done and run_task.exception() is not None:
                raise run_task.exception()  # type: ignore[misc]  # checked just above

            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            while not run_task.done():
                await response.write(b": running\n\n")
                await asyncio.wait({run_task}, timeout=KEEPALIVE_INTERVAL_S)
        finally:
            # The client went away (this handler was cancelled) or a write
            # failed: the run stops too.
            if not run_task.done():
                run_task.cancel()
                await asyncio.wait({run_task}, timeout=SHUTDOWN_GRACE_S)
        try:
            result = run_task.result()
            content = self._content(result)
        except _ApiError as exc:
            await _send_event(response, {"error": exc.error})
            await response.write(b"data: [DONE]\n\n")
            return response

        base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_id,
        }
        await _send_event(
            response,
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": content},
                        "finish_reason": None,
                    }
                ],
            },
        )
        await _send_event(
            response,
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "rlm_graph": _extension(result),
            },
        )
        if (chat.stream_options or {}).get("include_usage"):
            await _send_event(
                response, {**base, "choices": [], "usage": _usage(result)}
            )
        await response.write(b"data: [DONE]\n\n")

        return response


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every HTTP error as JSON in OpenAI's error shape; no tracebacks out."""
    try:
        return await handler(request)
    except _ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _as_json_error(exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception(
            "unexpected error answering %s %s", request.method, request.path
        )
        msg = "Internal error; the server log has the details."
        return _error(500, msg, kind="server_error").response()


def _make_auth(token: SecretStr | None) -> Any:
    expected = token.get_secret_value().encode() if token is not None else None

    @web.middleware
    async def auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if expected is None:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected
        ):
            msg = "Missing or wrong bearer token: send 'Authorization: Bearer <token>'."
            error = _error(
                401, msg, kind="authentication_error", code="invalid_api_key"
            )
            error.headers["WWW-Authenticate"] = "Bearer"
            raise error
        return await handler(request)

    return auth


async def _read_json(request: web.Request, limit_bytes: int) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        msg = (
            f"The request body is larger than this server's limit of {limit_bytes:,} "
            "bytes; send a smaller text or raise the limit (rlm-graph serve --max-request-mb)."
        )
        raise _error(
            413, msg, kind="invalid_request_error", code="request_too_large"
        ) from exc
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"The request body is not valid JSON: {exc}."
        raise _bad_request(msg) from exc


def _check_exposure(settings: ServeSettings) -> None:
    if settings.token is None and not _is_loopback(settings.host):
        msg = (
            f"Refusing to serve on {settings.host} without a token: anyone who can reach "
            "it could spend your model budget. Pass --token (or RLM_GRAPH_SERVE_TOKEN), "
            "or bind 127.0.0.1."
        )
        raise ConfigError(msg)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(host: str, runner: web.AppRunner) -> str:
    port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


class _ApiError(Exception):
    """An error answer in OpenAI's shape; the middleware turns it into JSON."""

    def __init__(
        self, status: int, error: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error["message"])
        self.status = status
        self.error = error
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(
            {"error": self.error}, status=self.status, headers=self.headers
        )


def _error(
    status: int,
    message: str,
    *,
    kind: str,
    code: str | None = None,
    param: str | None = None,
) -> _ApiError:
    return _ApiError(
        status, {"message": message, "type": kind, "param": param, "code": code}
    )


def _bad_request(message: str, *, param: str | None = None) -> _ApiError:
    return _error(400, message, kind="invalid_request_error", param=param)


def _as_json_error(exc: web.HTTPException) -> web.Response:
    messages = {
        404: "No such endpoint; this server has GET /v1/models and POST /v1/chat/completions.",
        405: f"This endpoint does not take this method; allowed: {exc.headers.get('Allow', '')}.",
    }
    message = messages.get(exc.status, exc.reason)
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": str(exc.status),
        }
    }
    headers = {
        name: exc.headers[name]
        for name in ("Allow", "WWW-Authenticate")
        if name in exc.headers
    }

    return web.json_response(body, status=exc.status, headers=headers)


def _first_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"Invalid request: '{where}': {first.get('msg')}."


def _first_param(exc: ValidationError) -> str | None:
    loc = exc.errors()[0].get("loc", ())
    return str(loc[0]) if loc else None


def _usage(result: Result) -> dict[str, int]:
    usage = result.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _extension(result: Result) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "status": result.status,
        "found": result.found,
        "answer": result.answer,
        "citations": [c.model_dump(mode="json") for c in result.citations],
        "failures": [f.model_dump(mode="json") for f in result.failures],
        "calls": result.usage.calls,
    }


async def _send_event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
