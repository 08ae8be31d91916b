"""FakeOpenAIServer: an OpenAI-compatible HTTP double on the loopback interface.

It owns the wire side of the doubles: the chat.completion JSON, error bodies,
status codes and headers, and the failure modes only HTTP has (a stalled body,
an error inside a 200). It binds loopback addresses only and does not stream.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from rlm_graph.testing._replies import (
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

logger = logging.getLogger(__name__)

HANG_LIMIT_S = 600.0
"""Longest a ``"timeout"`` or ``"stall"`` reply holds a request open."""

STOP_JOIN_TIMEOUT_S = 0.5
"""How long :meth:`FakeOpenAIServer.stop` waits for each thread to end."""

_POLL_INTERVAL_S = 0.05

# (status, OpenAI error type, code, default message) per Reply.error.
_ERRORS: dict[str, tuple[int, str, str | None, str]] = {
    "rate_limit": (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        "Rate limit reached for requests (fake server).",
    ),
    "server_error": (
        500,
        "server_error",
        None,
        "The server had an error while processing your request.",
    ),
    "unavailable": (
        503,
        "service_unavailable_error",
        None,
        "The server is overloaded or not ready yet.",
    ),
    "bad_request": (
        400,
        "invalid_request_error",
        None,
        "Invalid request (fake server).",
    ),
    "auth": (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided (fake server).",
    ),
    "context_window": (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "",
    ),
}


class FakeOpenAIServer(RequestLog):
    """A loopback HTTP server speaking the OpenAI chat completions API.

    Call it through LiteLLM as ``model="openai/<name>"`` with
    ``api_base=server.api_base``. Endpoints: ``POST /v1/chat/completions`` and
    ``GET /v1/models``. Requests are recorded like :class:`ScriptedModel` does
    (``requests``, ``calls_per_prompt``, ``in_flight``, ``max_in_flight``).

    A ``"timeout"`` or ``"stall"`` request stays in ``in_flight`` until the
    server stops, even after the client gave up.

    Example:
        ```python
        with FakeOpenAIServer(sequence("42")) as server:
            response = await litellm.acompletion(
                model="openai/x",
                api_base=server.api_base,
                api_key="sk-fake",
                max_retries=0,
                messages=[{"role": "user", "content": "Q?"}],
            )
        assert response.choices[0].message.content == "42"
        assert server.requests[0].api_key == "sk-fake"
        ```
    """

    def __init__(
        self,
        responder: Responder,
        *,
        context_window: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Sequence[str] = ("fake-model",),
    ) -> None:
        """Create the server; nothing listens until :meth:`start`.

        Args:
            responder: Decides the reply for each chat completion request.
            context_window: Tokens the server accepts (prompt plus
                ``max_tokens``); None means unlimited.
            host: A loopback address (``127.0.0.1``, ``::1``, ``localhost``).
            port: TCP port; 0 picks a free one.
            models: Model ids listed by ``GET /v1/models``.

        Raises:
            ValueError: ``host`` is not a loopback address.
        """
        _check_loopback(host)
        RequestLog.__init__(self)
        self.responder = responder
        self.context_window = context_window
        self.host = host
        self.port = port
        self.models = tuple(models)
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        """The server root, ``http://127.0.0.1:PORT``.

        Raises:
            RuntimeError: The server is not running.
        """
        if self._httpd is None:
            msg = "FakeOpenAIServer is not running; use it in a with block."
            raise RuntimeError(msg)
        host = self.host if ":" not in self.host else f"[{self.host}]"

        return f"http://{host}:{self._httpd.server_address[1]}"

    @property
    def api_base(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def start(self) -> Self:
        """Bind and serve in a daemon thread.

        Returns:
            The server itself.

        Raises:
            RuntimeError: It is already running.
        """
        if self._httpd is not None:
            msg = "FakeOpenAIServer is already running."
            raise RuntimeError(msg)
        self._stopping.clear()
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"FakeOpenAIServer:{self._httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("FakeOpenAIServer listening on %s", self.url)

        return self

    def stop(self) -> None:
        """Stop serving, release hung requests, close every connection, join.

        Safe to call twice. Takes well under a second even with requests hung
        by ``"timeout"`` or ``"stall"`` replies.
        """
        if self._httpd is None or self._thread is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join(STOP_JOIN_TIMEOUT_S)
        self._httpd.join_handlers(STOP_JOIN_TIMEOUT_S)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _hang(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the server stops."""
        self._stopping.wait(seconds)

    def _completion_body(self, request: ModelRequest, reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.message_content,
            "refusal": reply.refusal,
        }
        body: dict[str, Any] = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": reply.finish_reason}
            ],
        }
        if reply.include_usage:
            completion_tokens = count_tokens(reply.content)
            body["usage"] = {
                "prompt_tokens": request.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": request.prompt_tokens + completion_tokens,
            }

        return body


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks its connections so stop can cut them."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: sixteen clients connecting
    # at once on a busy machine overflowed it, and connections were reset or
    # stalled on SYN retransmits. Real servers listen with hundreds.
    request_queue_size = 256

    def __init__(self, double: FakeOpenAIServer) -> None:
        self.double = double
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        if ":" in double.host:
            self.address_family = socket.AF_INET6
        super().__init__((double.host, double.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._handlers.add(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.discard(request)
                self._handlers.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr here; a test double stays quiet.
        # socketserver calls this inside its except block, so exc_info is set.
        logger.debug(
            "FakeOpenAIServer: error on a connection",
            exc_info=True,  # noqa: LOG014
        )

    def close_connections(self) -> None:
        """Shut down every open connection, so idle keep-alive reads end."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                logger.debug("connection already closed during stop")

    def join_handlers(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` in total for handler threads to end."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 so LiteLLM's pooled clients keep it alive."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm on, the body
    # waits for the client's delayed ACK (about 40 ms on Linux) on every reply.
    # Real model servers (uvicorn, aiohttp, llama.cpp) set TCP_NODELAY too.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._send_error_json(404, "invalid_request_error", None, "Not found.")
            return
        models = [
            {"id": name, "object": "model", "created": 0, "owned_by": "rlm-graph"}
            for name in self.server.double.models
        ]
        self._send_json(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._drain_body()
            self._send_error_json(404, "invalid_request_error", None, "Not found.")
            return
        payload = self._read_json()
        if payload is None:
            return

        double = self.server.double
        request = build_request(
            model=str(payload.get("model", "")),
            messages=list(payload.get("messages") or []),
            response_format=payload.get("response_format"),
            max_tokens=payload.get("max_tokens", payload.get("max_completion_tokens")),
            api_key=self._bearer_token(),
        )
        double._record(request)
        double._enter()
        try:
            self._serve_completion(double, request)
        except OSError:
            # The client gave up (its timeout) or stop() cut the connection.
            logger.debug("connection closed before the reply was sent")
            self.close_connection = True
        finally:
            double._leave()

    def log_message(self, format: str, *args: Any) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("FakeOpenAIServer: %s", format % args)

    def _serve_completion(
        self, double: FakeOpenAIServer, request: ModelRequest
    ) -> None:
        too_long = context_window_message(request, double.context_window)
        if too_long is not None:
            self._send_error_json(
                400, "invalid_request_error", "context_length_exceeded", too_long
            )
            return

        try:
            reply = as_reply(double.responder(request))
        except Exception as exc:
            logger.exception("FakeOpenAIServer responder failed")
            self._send_error_json(500, "responder_error", None, str(exc))
            return

        double._hang(reply.latency_s)
        if reply.error == "timeout":
            double._hang(HANG_LIMIT_S)
            self.close_connection = True
            return
        body = self._reply_body(double, request, reply)
        status = 200
        if reply.error in _ERRORS and not reply.error_in_200:
            status = _ERRORS[reply.error][0]
        if reply.error == "stall":
            self._stall(reply, json.dumps(body).encode())
            return
        self._send_json(status, body, _reply_headers(reply))

    def _reply_body(
        self, double: FakeOpenAIServer, request: ModelRequest, reply: Reply
    ) -> dict[str, Any]:
        if reply.error in _ERRORS:
            return _error_body(reply.error, reply, request)
        if reply.error_in_200:
            return _error_body("server_error", reply, request)
        return double._completion_body(request, reply)

    def _stall(self, reply: Reply, body: bytes) -> None:
        """Send the status line and headers, promise a body, never send it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in _reply_headers(reply).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        self.server.double._hang(HANG_LIMIT_S)
        self.close_connection = True

    def _read_json(self) -> dict[str, Any] | None:
        """The request body as a JSON object; answers 400 and returns None if not."""
        try:
            payload = json.loads(self._drain_body() or b"null")
        except ValueError as exc:
            self._send_error_json(
                400, "invalid_request_error", None, f"Body is not JSON: {exc}"
            )
            return None
        if not isinstance(payload, dict):
            self._send_error_json(
                400, "invalid_request_error", None, "Body must be a JSON object."
            )
            return None
        return payload

    def _drain_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _bearer_token(self) -> str | None:
        value = self.headers.get("Authorization")
        if value is None:
            return None
        scheme, _, token = value.partition(" ")
        return token if scheme.lower() == "bearer" else value

    def _send_error_json(
        self, status: int, kind: str, code: str | None, message: str
    ) -> None:
        error = {"message": message, "type": kind, "param": None, "code": code}
        self._send_json(status, {"error": error})

    def _send_json(
        self,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def _check_loopback(host: str) -> None:
    """Raise ValueError unless every address ``host`` names is loopback."""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        msg = (
            f"FakeOpenAIServer binds loopback addresses only, not {host!r}; "
            "use host='127.0.0.1'."
        )
        raise ValueError(msg)


def _reply_headers(reply: Reply) -> dict[str, str]:
    headers = dict(reply.headers)
    if reply.retry_after is not None:
        headers["Retry-After"] = reply.retry_after
    return headers


def _error_body(kind: str, reply: Reply, request: ModelRequest) -> dict[str, Any]:
    _, error_type, code, default = _ERRORS[kind]
    message = reply.error_message or default
    if kind == "context_window" and not reply.error_message:
        message = explicit_context_message(request)
    error = {"message": message, "type": error_type, "param": None, "code": code}

    return {"error": error}
