"""The Router wrapper: retries, Retry-After, timeouts, errors, usage and cost."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from rlm_graph import ConfigError, ContextWindowError, ModelCallError, RunConfig
from rlm_graph.errors import BudgetExceeded
from rlm_graph.models import ModelClient, retry_after_seconds
from rlm_graph.testing import FakeOpenAIServer, Reply, sequence

MESSAGES = [{"role": "user", "content": "hello there"}]


def client_for(server: FakeOpenAIServer, **settings) -> ModelClient:
    config = RunConfig(
        model=settings.pop("model", "openai/fake-model"), api_base=server.api_base,
        api_key="sk-fake-key-for-tests", context_window=4096, **settings,
    )
    return ModelClient(config)


async def test_retry_after_is_honoured_on_every_attempt():
    # K02: growing Retry-After values are each waited for.
    replies = sequence(
        Reply(error="rate_limit", retry_after="1"),
        Reply(error="rate_limit", retry_after="2"),
        Reply(content="ok"),
    )
    with FakeOpenAIServer(replies) as server:
        client = client_for(server, max_retries=3)
        completion = await client.complete("worker", MESSAGES, max_tokens=16)
        times = [r.received_at for r in server.requests]

    assert completion.text == "ok"
    assert len(times) == 3
    assert times[1] - times[0] >= 0.95
    assert times[2] - times[1] >= 1.95


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "-3"}, None),
        ({"Retry-After": "soon"}, None),
        ({"retry-after-ms": "2500"}, 2.5),
        ({"Retry-After": "99999"}, 120.0),
        ({}, None),
    ],
)
def test_retry_after_values(headers, expected):
    # K16: seconds, decimals, ms, invalid values and clamping.
    assert retry_after_seconds(headers) == expected


def test_retry_after_http_date():
    now = time.time()
    header = email.utils.formatdate(now + 7, usegmt=True)
    assert retry_after_seconds({"Retry-After": header}, now=now) == pytest.approx(7, abs=1)


async def test_usage_and_cost_come_from_the_response_and_the_price_map():
    with FakeOpenAIServer(lambda r: "four words of answer") as server:
        client = client_for(server, model="openai/gpt-4o-mini")
        completion = await client.complete("worker", MESSAGES, max_tokens=16)

    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0
    assert client.usage.calls == 1
    assert client.usage.prompt_tokens == completion.prompt_tokens
    assert client.usage.cost_usd > 0 and client.usage.cost_known


async def test_unpriced_model_is_flagged_not_silently_free():
    with FakeOpenAIServer(lambda r: "x") as server:
        client = client_for(server, model="openai/some-private-model")
        await client.complete("worker", MESSAGES, max_tokens=16)
    assert client.usage.cost_known is False


async def test_response_without_usage_is_counted_from_what_was_sent():
    with FakeOpenAIServer(lambda r: Reply(content="an answer", include_usage=False)) as server:
        client = client_for(server)
        completion = await client.complete("worker", MESSAGES, max_tokens=16)
    assert completion.prompt_tokens >= 2
    assert completion.completion_tokens >= 1


async def test_same_request_is_answered_from_the_call_log():
    with FakeOpenAIServer(lambda r: "once") as server:
        client = client_for(server)
        first = await client.complete("worker", MESSAGES, max_tokens=16)
        second = await client.complete("worker", MESSAGES, max_tokens=16)
        assert len(server.requests) == 1
    assert second.cached and not first.cached
    assert client.usage.calls == 1 and client.usage.cached_calls == 1


@pytest.mark.parametrize(
    "wording",
    [
        "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
        "The input (9100 tokens) is longer than the model's context length (8000 tokens).",
        "the request exceeds the available context size, try increasing it",
        "Requested token count exceeds the model's maximum context length of 2048 tokens.",
    ],
    ids=["openai", "sglang", "llamacpp", "vllm"],
)
async def test_context_errors_are_recognised_whatever_the_wording(wording):
    # K05: classified as context overflow and never retried as transient.
    with FakeOpenAIServer(lambda r: Reply(error="bad_request", error_message=wording)) as server:
        client = client_for(server, max_retries=3)
        with pytest.raises(ContextWindowError):
            await client.complete("worker", MESSAGES, max_tokens=16)
        assert len(server.requests) == 1


async def test_context_error_inside_a_200_response_is_recognised():
    wording = "The input (9100 tokens) is longer than the model's context length (8000 tokens)."
    reply = Reply(error="bad_request", error_message=wording, error_in_200=True)
    with FakeOpenAIServer(lambda r: reply) as server:
        client = client_for(server)
        with pytest.raises(ContextWindowError):
            await client.complete("worker", MESSAGES, max_tokens=16)


async def test_stalled_request_times_out_and_is_retried():
    # K12: a server that sends headers and then nothing does not hang the run.
    replies = sequence(Reply(error="stall"), Reply(content="recovered"))
    with FakeOpenAIServer(replies) as server:
        client = client_for(server, timeout_s=1.0, max_retries=2)
        started = time.monotonic()
        completion = await client.complete("worker", MESSAGES, max_tokens=16)
    assert completion.text == "recovered"
    assert time.monotonic() - started < 10


async def test_stalled_forever_fails_the_call_not_the_process():
    with FakeOpenAIServer(lambda r: Reply(error="stall")) as server:
        client = client_for(server, timeout_s=0.5, max_retries=1)
        with pytest.raises(ModelCallError) as caught:
            await client.complete("worker", MESSAGES, max_tokens=16)
    assert not caught.value.systemic, "one stalled request must not stop the whole run"


async def test_api_key_never_appears_in_errors():
    with FakeOpenAIServer(lambda r: Reply(error="auth", error_message="bad key sk-fake-key-for-tests")) as server:
        client = client_for(server)
        with pytest.raises(ModelCallError) as caught:
            await client.complete("worker", MESSAGES, max_tokens=16)
    assert "sk-fake-key-for-tests" not in str(caught.value)
    assert caught.value.systemic


async def test_global_concurrency_limit():
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.1)) as server:
        client = client_for(server, concurrency=3)
        await asyncio.gather(*(
            client.complete("worker", [{"role": "user", "content": f"q{i}"}], max_tokens=8)
            for i in range(12)
        ))
        assert server.max_in_flight <= 3


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="Unknown model 'nonsense-model-xyz'"):
        ModelClient(RunConfig(model="nonsense-model-xyz"))


def test_router_cooldown_is_retried_after_the_time_it_names():
    import litellm

    from rlm_graph.models import _is_transient, _wait_retry_after

    cooling = litellm.RouterRateLimitError(
        model="fast", cooldown_time=2.0, enable_pre_call_checks=False, cooldown_list=[]
    )
    assert _is_transient(cooling)

    class Outcome:
        def exception(self):
            return cooling

    class State:
        outcome = Outcome()
        attempt_number = 1

    assert 1.9 <= _wait_retry_after(State()) <= 2.1  # type: ignore[arg-type]


def test_unusable_replies_are_not_recorded_in_the_call_log():
    from rlm_graph.models import Completion, _usable

    asked_json = {"response_format": {"type": "json_schema"}}
    assert _usable(Completion('{"a": 1}', "stop", 1, 1), asked_json)
    assert not _usable(Completion("not json", "stop", 1, 1), asked_json)
    assert not _usable(Completion("", "stop", 1, 0), {})
    assert not _usable(Completion("x", "stop", 1, 1, refusal="no"), {})
    assert _usable(Completion("plain text", "stop", 1, 1), {})


async def test_a_timed_out_attempt_counts_the_prompt_it_sent():
    replies = sequence(Reply(error="timeout"), Reply(content="ok"))
    with FakeOpenAIServer(replies) as server:
        client = client_for(
            server, timeout_s=0.5, max_retries=1, price_in=2, price_out=8
        )
        completion = await client.complete("worker", MESSAGES, max_tokens=16)
        assert len(server.requests) == 2

    sent = client.count_tokens("worker", MESSAGES[0]["content"])
    usage = client.usage
    assert usage.calls == 2 and usage.timed_out_calls == 1
    assert usage.prompt_tokens == completion.prompt_tokens + sent
    assert usage.cost_usd == pytest.approx(completion.cost_usd + sent * 2e-6)
    assert client.budget.tokens == usage.prompt_tokens + usage.completion_tokens


async def test_timed_out_prompts_count_against_the_token_budget():
    long_question = [{"role": "user", "content": "word " * 40}]
    with FakeOpenAIServer(lambda r: Reply(error="timeout")) as server:
        client = client_for(server, timeout_s=0.3, max_retries=5, max_tokens=150)
        sent = client.count_tokens("worker", long_question[0]["content"])
        with pytest.raises(BudgetExceeded, match="max-tokens"):
            await client.complete("worker", long_question, max_tokens=16)

    # Each attempt holds prompt + 16 while in flight and keeps its prompt after:
    # the third would cross 150 tokens, so only two were sent.
    assert 40 <= sent <= 60
    assert client.usage.calls == client.usage.timed_out_calls == 2
    assert len(server.requests) <= 2  # on loaded cores one may time out unread
    assert client.budget.tokens == client.usage.prompt_tokens == 2 * sent


async def test_a_timeout_says_it_timed_out_after_how_long_and_where():
    with FakeOpenAIServer(lambda r: Reply(error="stall")) as server:
        client = client_for(server, timeout_s=0.5, max_retries=1)
        with pytest.raises(ModelCallError) as caught:
            await client.complete("worker", MESSAGES, max_tokens=16)
        api_base = server.api_base

    message = str(caught.value)
    assert "timed out" in message and "0.5 s" in message
    assert f"openai/fake-model at {api_base}" in message
    assert "2 of 2 attempts" in message
    assert "Cannot reach" not in message and "sk-fake-key-for-tests" not in message
