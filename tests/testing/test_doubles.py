"""Tests for the model doubles in rlm_graph.testing, driven through real LiteLLM."""

from __future__ import annotations

import os

# Before litellm's first import, or it tries to fetch its cost map from GitHub
# (STACK-FINDINGS.md section 1). A tests/conftest.py should own this once it exists.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import litellm
import pytest

from rlm_graph.testing import (
    FakeOpenAIServer,
    ModelRequest,
    Reply,
    ScriptedModel,
    by_prompt,
    prompt_digest,
    sequence,
)
from rlm_graph.testing._replies import count_tokens

# litellm lazily imports its github_copilot provider on the first call, and pydantic
# warns about the ReadOnly TypedDicts there. pyproject's filterwarnings should carry
# this ignore; until it does, it is scoped to this module.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Items? .* on TypedDict class .*ReadOnly:UserWarning"
)

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
PROMPT = "You answer briefly.\nWhat is the capital of France?"

# Over HTTP litellm classifies a 400 by its wording, so the context-window case
# uses a phrase litellm knows (see test_server_unknown_context_wording_...).
ERROR_CASES = [
    ("rate_limit", litellm.RateLimitError, 429, "slow down"),
    ("server_error", litellm.InternalServerError, 500, "boom"),
    ("unavailable", litellm.ServiceUnavailableError, 503, "warming up"),
    ("bad_request", litellm.BadRequestError, 400, "bad field"),
    ("auth", litellm.AuthenticationError, 401, "bad key"),
    (
        "context_window",
        litellm.ContextWindowExceededError,
        400,
        "This model's maximum context length is 10 tokens (fake).",
    ),
]


@pytest.fixture(autouse=True)
def _quiet_litellm() -> Iterator[None]:
    # litellm prints a feedback banner to stdout on every failed call.
    before = litellm.suppress_debug_info
    litellm.suppress_debug_info = True
    yield
    litellm.suppress_debug_info = before


def _never_called(request: ModelRequest) -> Reply:
    raise AssertionError("the responder must not be called")


async def _ask_scripted(**kwargs: object) -> litellm.ModelResponse:
    return await litellm.acompletion(model="scripted/x", messages=MESSAGES, **kwargs)


async def _ask_server(
    server: FakeOpenAIServer, **kwargs: object
) -> litellm.ModelResponse:
    return await litellm.acompletion(
        model="openai/x",
        api_base=server.api_base,
        api_key="sk-fake",
        max_retries=0,
        messages=MESSAGES,
        **kwargs,
    )


# --- helpers -------------------------------------------------------------------


def test_sequence_returns_replies_in_order_then_repeats_last() -> None:
    respond = sequence("a", Reply(content="b", finish_reason="length"))
    request = _request()

    answers = [respond(request) for _ in range(4)]

    assert answers[0] == "a"
    assert answers[1:] == [Reply(content="b", finish_reason="length")] * 3


def test_sequence_needs_a_reply() -> None:
    with pytest.raises(ValueError, match="at least one reply"):
        sequence()


def test_by_prompt_matches_substrings_in_order_then_default() -> None:
    respond = by_prompt({"France": "Paris", "capital": "generic"}, default="?")

    assert respond(_request(PROMPT)) == "Paris"
    assert respond(_request("capital of Spain")) == "generic"
    assert respond(_request("hello")) == "?"


def test_by_prompt_function_without_default_raises_lookup_error() -> None:
    respond = by_prompt(lambda prompt: "yes" if "?" in prompt else None)

    assert respond(_request("ok?")) == "yes"
    with pytest.raises(LookupError, match="no rule matched"):
        respond(_request("statement"))


def test_reply_rejects_unknown_error_kind_and_negative_latency() -> None:
    with pytest.raises(ValueError, match=r"Unknown Reply\.error 'teapot'"):
        Reply(error="teapot")
    with pytest.raises(ValueError, match="latency_s must be >= 0"):
        Reply(latency_s=-1)


# --- ScriptedModel ---------------------------------------------------------------


async def test_scripted_model_docstring_example() -> None:
    with ScriptedModel(sequence("42")) as model:
        response = await litellm.acompletion(
            model="scripted/x", messages=[{"role": "user", "content": "Q?"}]
        )
    assert response.choices[0].message.content == "42"
    assert model.requests[0].prompt == "Q?"


async def test_scripted_model_answers_and_records_the_request() -> None:
    with ScriptedModel(sequence("Paris")) as model:
        first = await _ask_scripted(
            api_key="sk-scripted",
            max_tokens=20,
            response_format={"type": "json_object"},
        )
        await _ask_scripted()

    assert first.choices[0].message.content == "Paris"
    assert first.choices[0].finish_reason == "stop"
    assert first.model == "x"
    request = model.requests[0]
    assert request.model == "x"
    assert request.prompt == PROMPT
    assert request.messages == MESSAGES
    assert request.api_key == "sk-scripted"
    assert request.max_tokens == 20
    assert request.response_format == {"type": "json_object"}
    assert request.prompt_tokens == count_tokens(PROMPT)
    assert model.calls_per_prompt[prompt_digest(PROMPT)] == 2
    assert len(model.requests) == 2


async def test_scripted_model_reports_usage_from_token_counts() -> None:
    with ScriptedModel(sequence("The capital is Paris.")):
        response = await _ask_scripted()

    assert response.usage.prompt_tokens == count_tokens(PROMPT)
    assert response.usage.completion_tokens == count_tokens("The capital is Paris.")
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


async def test_scripted_model_without_usage_gets_no_invented_usage() -> None:
    with ScriptedModel(sequence(Reply("Paris", include_usage=False))):
        response = await _ask_scripted()

    # litellm leaves a custom provider's ModelResponse without a usage attribute.
    assert getattr(response, "usage", None) is None
    assert "usage" not in response.model_dump()


async def test_scripted_model_sends_refusal_and_finish_reason() -> None:
    with ScriptedModel(sequence(Reply(refusal="I can't help with that."))):
        refused = await _ask_scripted()
    with ScriptedModel(sequence(Reply("Par", finish_reason="length"))):
        cut = await _ask_scripted()

    assert refused.choices[0].message.refusal == "I can't help with that."
    assert refused.choices[0].message.content is None
    assert cut.choices[0].finish_reason == "length"


def test_scripted_model_serves_blocking_completion() -> None:
    with ScriptedModel(sequence(Reply("Paris", latency_s=0.05))) as model:
        started = time.monotonic()
        response = litellm.completion(model="scripted/x", messages=MESSAGES)

    assert response.choices[0].message.content == "Paris"
    assert time.monotonic() - started >= 0.05
    assert model.in_flight == 0


async def test_scripted_model_is_reached_through_a_router() -> None:
    router = litellm.Router(
        model_list=[{"model_name": "worker", "litellm_params": {"model": "scripted/x"}}]
    )
    with ScriptedModel(sequence("Paris")) as model:
        response = await router.acompletion(model="worker", messages=MESSAGES)

    assert response.choices[0].message.content == "Paris"
    assert len(model.requests) == 1


async def test_router_honours_retry_after_from_scripted_rate_limit() -> None:
    router = litellm.Router(
        model_list=[
            {"model_name": "worker", "litellm_params": {"model": "scripted/x"}}
        ],
        num_retries=1,
    )
    replies = sequence(Reply(error="rate_limit", retry_after="1"), "Paris")
    with ScriptedModel(replies) as model:
        response = await router.acompletion(model="worker", messages=MESSAGES)

    first, second = model.requests
    assert response.choices[0].message.content == "Paris"
    assert second.received_at - first.received_at >= 0.9


@pytest.mark.parametrize(("kind", "error_class", "status", "text"), ERROR_CASES)
async def test_scripted_model_raises_litellm_error(
    kind: str, error_class: type[Exception], status: int, text: str
) -> None:
    reply = Reply(error=kind, error_message=text)
    with ScriptedModel(sequence(reply)), pytest.raises(error_class) as caught:
        await _ask_scripted()

    assert text in str(caught.value)
    assert caught.value.status_code == status  # type: ignore[attr-defined]


async def test_scripted_rate_limit_carries_retry_after_in_response_headers() -> None:
    reply = Reply(error="rate_limit", retry_after="1.5", headers={"x-extra": "1"})
    with (
        ScriptedModel(sequence(reply)),
        pytest.raises(litellm.RateLimitError) as caught,
    ):
        await _ask_scripted()

    headers = caught.value.response.headers
    assert headers["retry-after"] == "1.5"
    assert headers["x-extra"] == "1"


async def test_scripted_timeout_hangs_until_the_call_timeout() -> None:
    with ScriptedModel(sequence(Reply(error="timeout"))) as model:
        started = time.monotonic()
        with pytest.raises(litellm.Timeout):
            await _ask_scripted(timeout=0.2)

    assert 0.2 <= time.monotonic() - started < 2
    assert model.in_flight == 0


async def test_scripted_context_window_rejects_without_calling_responder() -> None:
    window = count_tokens(PROMPT) + 5
    with (
        ScriptedModel(_never_called, context_window=window) as model,
        pytest.raises(litellm.ContextWindowExceededError) as caught,
    ):
        await _ask_scripted(max_tokens=6)

    assert f"maximum context length is {window} tokens" in str(caught.value)
    assert f"you requested {window + 1} tokens" in str(caught.value)
    assert len(model.requests) == 1


async def test_scripted_context_window_admits_an_exact_fit() -> None:
    window = count_tokens(PROMPT) + 5
    with ScriptedModel(sequence("ok"), context_window=window):
        response = await _ask_scripted(max_tokens=5)

    assert response.choices[0].message.content == "ok"


@pytest.mark.parametrize("reply", [Reply(error="stall"), Reply(error_in_200=True)])
async def test_scripted_model_refuses_http_only_replies(reply: Reply) -> None:
    with (
        ScriptedModel(sequence(reply)),
        pytest.raises(litellm.APIConnectionError, match="use FakeOpenAIServer"),
    ):
        await _ask_scripted()


async def test_scripted_model_counts_concurrent_requests() -> None:
    with ScriptedModel(sequence(Reply("ok", latency_s=0.3))) as model:
        await asyncio.gather(*(_ask_scripted() for _ in range(5)))

    assert model.max_in_flight == 5
    assert model.in_flight == 0


async def test_scripted_model_reset_forgets_requests() -> None:
    with ScriptedModel(sequence("ok")) as model:
        await _ask_scripted()
        model.reset()

    assert model.requests == []
    assert model.calls_per_prompt == {}
    assert model.max_in_flight == 0


async def test_register_replaces_same_provider_and_keeps_others() -> None:
    old = ScriptedModel(sequence("old")).register()
    other = ScriptedModel(sequence("other"), provider="scripted-other").register()
    new = ScriptedModel(sequence("new")).register()
    try:
        handlers = [e["custom_handler"] for e in litellm.custom_provider_map]
        assert old not in handlers
        assert other in handlers
        assert new in handlers
        old.unregister()  # not registered any more: must not remove `new`
        assert (await _ask_scripted()).choices[0].message.content == "new"
        response = await litellm.acompletion(
            model="scripted-other/y", messages=MESSAGES
        )
        assert response.choices[0].message.content == "other"
    finally:
        new.unregister()
        other.unregister()

    with pytest.raises(litellm.BadRequestError, match="Unmapped LLM provider"):
        await _ask_scripted()


def test_scripted_model_rejects_builtin_provider_name() -> None:
    with pytest.raises(ValueError, match="built into LiteLLM"):
        ScriptedModel(sequence("x"), provider="openai")


# --- FakeOpenAIServer ------------------------------------------------------------


async def test_server_docstring_example() -> None:
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


async def test_server_answers_through_litellm_and_records() -> None:
    with FakeOpenAIServer(sequence("Paris")) as server:
        response = await _ask_server(
            server, max_tokens=20, response_format={"type": "json_object"}
        )
        await _ask_server(server)
        assert server.api_base == f"{server.url}/v1"

    assert response.choices[0].message.content == "Paris"
    assert response.usage.prompt_tokens == count_tokens(PROMPT)
    assert response.usage.completion_tokens == count_tokens("Paris")
    request = server.requests[0]
    assert request.model == "x"
    assert request.prompt == PROMPT
    assert request.api_key == "sk-fake"
    assert request.max_tokens == 20
    assert request.response_format == {"type": "json_object"}
    assert server.calls_per_prompt[prompt_digest(PROMPT)] == 2


def test_server_sends_chat_completion_json() -> None:
    reply = Reply("Par", finish_reason="length", headers={"x-request-id": "r1"})
    with FakeOpenAIServer(sequence(reply)) as server:
        response = _post(server, {"model": "m", "messages": MESSAGES})

    body = response.json()
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "r1"
    assert body["object"] == "chat.completion"
    assert body["id"]
    assert isinstance(body["created"], int)
    assert body["model"] == "m"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Par", "refusal": None}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == count_tokens(PROMPT) + count_tokens("Par")


def test_server_lists_models() -> None:
    with FakeOpenAIServer(sequence("x"), models=("a", "b")) as server:
        response = httpx.get(f"{server.api_base}/models")

    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["a", "b"]


def test_server_answers_404_on_unknown_path() -> None:
    with FakeOpenAIServer(sequence("x")) as server:
        response = httpx.post(f"{server.api_base}/embeddings", json={})

    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Not found."


async def test_server_without_usage_omits_it_and_litellm_fills_zeros() -> None:
    with FakeOpenAIServer(sequence(Reply("Paris", include_usage=False))) as server:
        raw = _post(server, {"model": "m", "messages": MESSAGES}).json()
        response = await _ask_server(server)

    assert "usage" not in raw
    # litellm's OpenAI path invents an all-zero usage when the server sends none.
    assert response.usage.total_tokens == 0


async def test_server_sends_refusal() -> None:
    with FakeOpenAIServer(sequence(Reply(refusal="I can't help."))) as server:
        response = await _ask_server(server)

    assert response.choices[0].message.refusal == "I can't help."
    assert response.choices[0].message.content is None


@pytest.mark.parametrize(("kind", "error_class", "status", "text"), ERROR_CASES)
async def test_server_error_maps_to_litellm_error(
    kind: str, error_class: type[Exception], status: int, text: str
) -> None:
    reply = Reply(error=kind, error_message=text)
    with FakeOpenAIServer(sequence(reply)) as server:
        raw = _post(server, {"model": "m", "messages": MESSAGES})
        with pytest.raises(error_class) as caught:
            await _ask_server(server)

    assert raw.status_code == status
    assert raw.json()["error"]["message"] == text
    assert set(raw.json()["error"]) >= {"message", "type", "code"}
    assert text in str(caught.value)


async def test_server_unknown_context_wording_is_a_plain_bad_request() -> None:
    # litellm ignores the context_length_exceeded code and reads only the text.
    reply = Reply(error="context_window", error_message="prompt has too many tokens")
    with (
        FakeOpenAIServer(sequence(reply)) as server,
        pytest.raises(litellm.BadRequestError) as caught,
    ):
        await _ask_server(server)

    assert not isinstance(caught.value, litellm.ContextWindowExceededError)


def test_server_sends_retry_after_and_extra_headers() -> None:
    reply = Reply(
        error="rate_limit", retry_after="1.5", headers={"retry-after-ms": "1500"}
    )
    with FakeOpenAIServer(sequence(reply)) as server:
        response = _post(server, {"model": "m", "messages": MESSAGES})

    assert response.status_code == 429
    assert response.headers["retry-after"] == "1.5"
    assert response.headers["retry-after-ms"] == "1500"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


async def test_server_context_window_rejects_without_calling_responder() -> None:
    window = count_tokens(PROMPT) + 5
    with FakeOpenAIServer(_never_called, context_window=window) as server:
        raw = _post(server, {"model": "m", "messages": MESSAGES, "max_tokens": 6})
        with pytest.raises(litellm.ContextWindowExceededError):
            await _ask_server(server, max_tokens=6)

    assert raw.status_code == 400
    error = raw.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith(
        f"This model's maximum context length is {window} tokens. "
        f"However, you requested {window + 1} tokens"
    )
    assert len(server.requests) == 2


async def test_server_context_error_message_override_still_maps() -> None:
    llama_cpp = "the request exceeds the available context size, try increasing it"
    reply = Reply(error="context_window", error_message=llama_cpp)
    with (
        FakeOpenAIServer(sequence(reply)) as server,
        pytest.raises(litellm.ContextWindowExceededError, match="available"),
    ):
        await _ask_server(server)


async def test_server_error_in_200_is_not_a_completion() -> None:
    reply = Reply(error_in_200=True, error_message="upstream exploded")
    with FakeOpenAIServer(sequence(reply)) as server:
        raw = _post(server, {"model": "m", "messages": MESSAGES})
        with pytest.raises(litellm.APIError, match="upstream exploded"):
            await _ask_server(server)

    assert raw.status_code == 200
    assert raw.json()["error"]["message"] == "upstream exploded"


async def test_server_timeout_hangs_until_client_gives_up() -> None:
    with FakeOpenAIServer(sequence(Reply(error="timeout"))) as server:
        started = time.monotonic()
        with pytest.raises(litellm.Timeout):
            await _ask_server(server, timeout=0.3)

    assert 0.3 <= time.monotonic() - started < 2


async def test_server_stall_sends_headers_but_no_body() -> None:
    with FakeOpenAIServer(sequence(Reply(error="stall"))) as server:
        with httpx.Client(timeout=httpx.Timeout(5, read=0.3)) as client:
            request = client.build_request(
                "POST", f"{server.api_base}/chat/completions", json={"messages": []}
            )
            response = client.send(request, stream=True)
            assert response.status_code == 200
            assert int(response.headers["content-length"]) > 0
            with pytest.raises(httpx.ReadTimeout):
                response.read()
            response.close()
        with pytest.raises(litellm.Timeout):
            await _ask_server(server, timeout=0.3)


async def test_server_stops_quickly_with_hung_requests() -> None:
    server = FakeOpenAIServer(sequence(Reply(error="timeout"))).start()
    async with httpx.AsyncClient(timeout=5) as client:
        url = f"{server.api_base}/chat/completions"
        body = {"model": "m", "messages": MESSAGES}
        pending = [asyncio.create_task(client.post(url, json=body)) for _ in range(3)]
        while server.in_flight < 3:
            await asyncio.sleep(0.01)

        started = time.monotonic()
        server.stop()
        stop_s = time.monotonic() - started
        outcomes = await asyncio.gather(*pending, return_exceptions=True)

    assert stop_s < 1.0
    assert all(isinstance(o, httpx.HTTPError) for o in outcomes)
    assert server.in_flight == 0


async def test_server_counts_concurrent_requests() -> None:
    with FakeOpenAIServer(sequence(Reply("ok", latency_s=0.3))) as server:
        await _ask_server(server)  # warm litellm's client outside the timing
        server.reset()
        await asyncio.gather(*(_ask_server(server) for _ in range(4)))

    assert server.max_in_flight == 4
    assert server.in_flight == 0
    assert len(server.requests) == 4


def test_server_answers_500_when_the_responder_fails() -> None:
    with FakeOpenAIServer(by_prompt({"nothing matches": "x"})) as server:
        response = _post(server, {"model": "m", "messages": MESSAGES})

    assert response.status_code == 500
    assert "no rule matched" in response.json()["error"]["message"]


def test_server_rejects_a_body_that_is_not_json() -> None:
    with FakeOpenAIServer(sequence("x")) as server:
        response = httpx.post(
            f"{server.api_base}/chat/completions", content=b"{not json"
        )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com", "::"])
def test_server_refuses_non_loopback_host(host: str) -> None:
    with pytest.raises(ValueError, match="loopback addresses only"):
        FakeOpenAIServer(sequence("x"), host=host)


def test_server_url_needs_a_running_server() -> None:
    server = FakeOpenAIServer(sequence("x"))

    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    server.stop()  # stopping a server that never started is harmless


# --- helpers for the tests --------------------------------------------------------


def _request(prompt: str = PROMPT) -> ModelRequest:
    return ModelRequest(
        model="x",
        messages=[{"role": "user", "content": prompt}],
        prompt=prompt,
        response_format=None,
        max_tokens=None,
        prompt_tokens=0,
        api_key=None,
        received_at=0.0,
    )


def _post(server: FakeOpenAIServer, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        f"{server.api_base}/chat/completions",
        content=json.dumps(body),
        headers={"Authorization": "Bearer sk-fake"},
        timeout=5,
    )
