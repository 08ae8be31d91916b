"""Slots taken when the request leaves (rlm_graph/_wire.py), against the HTTP double.

After a group's first request is seen going through the client's aiohttp
session, its calls take their slots (parallel limit, pace, global limit,
budget) only as the request leaves; LiteLLM prepares them outside. These
tests check that every limit still holds at the server, and that waiting for
a slot there is neither a timeout nor a transport error.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from rlm_graph import RunConfig
from rlm_graph._wire import session_for_this_loop
from rlm_graph.errors import BudgetExceeded
from rlm_graph.models import ModelClient
from rlm_graph.testing import FakeOpenAIServer, Reply

WIRE_LOG = "take their slots when the request goes out"


def client_for(server: FakeOpenAIServer, **settings) -> ModelClient:
    return ModelClient(RunConfig(
        model="openai/fake-model", api_base=server.api_base,
        api_key="sk-fake-key-for-tests", context_window=4096, **settings,
    ))


def ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}]


async def warm(client: ModelClient, caplog: pytest.LogCaptureFixture) -> None:
    """One call, after which the worker group takes its slots at the wire."""
    with caplog.at_level(logging.DEBUG, logger="rlm_graph.models"):
        await client.complete("worker", ask(-1), max_tokens=8)
    assert WIRE_LOG in caplog.text


async def test_the_server_never_holds_more_than_the_concurrency(caplog):
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.05)) as server:
        client = client_for(server, concurrency=3)
        await warm(client, caplog)
        server.reset()
        await asyncio.gather(*(client.complete("worker", ask(i), max_tokens=8) for i in range(30)))
        assert server.max_in_flight == 3
        assert len(server.requests) == 30


async def test_a_group_parallel_limit_holds_at_the_wire(caplog, tmp_path):
    config = tmp_path / "router.yaml"
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.05)) as server:
        config.write_text(
            "model_list:\n"
            "  - model_name: worker\n"
            "    litellm_params:\n"
            "      model: openai/fake-model\n"
            f"      api_base: {server.api_base}\n"
            "      api_key: sk-fake-key-for-tests\n"
            "      max_parallel_requests: 2\n"
        )
        client = ModelClient(RunConfig(
            router_config=str(config), context_window=4096, concurrency=8,
        ))
        await warm(client, caplog)
        server.reset()
        await asyncio.gather(*(client.complete("worker", ask(i), max_tokens=8) for i in range(16)))
        assert server.max_in_flight == 2


async def test_waiting_for_a_slot_is_not_a_timeout(caplog):
    # One slot, 0.4 s per request, a 1 s timeout: the last of five calls waits
    # 1.6 s for its slot. Only the time at the server counts against it.
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.4)) as server:
        client = client_for(server, concurrency=1, timeout_s=1.0, max_retries=0)
        await warm(client, caplog)
        server.reset()
        replies = await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(5))
        )
        assert [r.text for r in replies] == ["x"] * 5
        assert len(server.requests) == 5
        assert client.usage.timed_out_calls == 0


async def test_a_budget_reached_while_waiting_at_the_wire_stops_cleanly(caplog):
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.1)) as server:
        client = client_for(server, concurrency=2, max_calls=5)
        await warm(client, caplog)
        results = await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(10)),
            return_exceptions=True,
        )
        done = [r for r in results if not isinstance(r, BaseException)]
        stopped = [r for r in results if isinstance(r, BudgetExceeded)]
        # The budget's error, not a connection error from LiteLLM wrapping it.
        assert len(done) == 4 and len(stopped) == 6, results
        assert len(server.requests) == 5
        assert client.budget.calls == 5
        assert client.usage.calls == 5


async def test_the_run_time_ends_waits_at_the_wire(caplog):
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.5)) as server:
        client = client_for(server, concurrency=1, max_time_s=1.5)
        await warm(client, caplog)
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(6)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        assert any(isinstance(r, BudgetExceeded) for r in results), results
        assert not any(
            isinstance(r, BaseException) and not isinstance(r, BudgetExceeded) for r in results
        ), results
        # Stopped when the time was up (1.5 s after the client was made),
        # not after the queued calls had all had their turn (3 s).
        assert elapsed < 2.0, elapsed
        assert client.budget.reason.startswith("max-time")


async def test_a_group_whose_requests_bypass_the_session_takes_slots_beforehand(
    caplog, monkeypatch
):
    import aiohttp
    import litellm

    from rlm_graph import models

    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.05)) as server:
        client = client_for(server, concurrency=2)
        await warm(client, caplog)

        # From now on LiteLLM sends through a session without the middleware:
        # a new HTTP client (its cache emptied) built on a plain session.
        plain = aiohttp.ClientSession()

        async def plain_session() -> aiohttp.ClientSession:
            return plain

        monkeypatch.setattr(models, "session_for_this_loop", plain_session)
        litellm.in_memory_llm_clients_cache.flush_cache()
        server.reset()
        try:
            with caplog.at_level(logging.INFO, logger="rlm_graph.models"):
                await asyncio.gather(
                    *(client.complete("worker", ask(i), max_tokens=8) for i in range(12))
                )
        finally:
            litellm.in_memory_llm_clients_cache.flush_cache()
            await plain.close()
        assert "went out without passing the slots at the wire" in caplog.text
        # The calls admitted before the group went back may exceed the limit
        # once (at most the admission margin); every later call takes a slot first.
        assert server.max_in_flight <= 2 + 2
        assert len(server.requests) == 12
        assert client.budget.calls == 13


def test_the_session_is_closed_when_its_loop_ends():
    async def main() -> object:
        return await session_for_this_loop()

    session = asyncio.run(main())
    assert session.closed


async def test_one_session_per_loop():
    assert await session_for_this_loop() is await session_for_this_loop()
