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
import threading
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


def router_client(tmp_path, server: FakeOpenAIServer, extra: str, **settings) -> ModelClient:
    config = tmp_path / "router.yaml"
    config.write_text(
        "model_list:\n  - model_name: worker\n    litellm_params:\n"
        "      model: openai/fake-model\n"
        f"      api_base: {server.api_base}\n      api_key: sk-fake-key-for-tests\n" + extra
    )
    return ModelClient(RunConfig(router_config=str(config), context_window=4096, **settings))


async def test_a_group_parallel_limit_holds_and_the_router_refuses_nothing(tmp_path):
    # LiteLLM's Router counts max_parallel_requests from the moment it is
    # called: calls waiting at the wire would fill it and it would refuse the
    # rest (RateLimitError, counted as sent). Such a group takes its slots first.
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.1)) as server:
        client = router_client(
            tmp_path, server, "      max_parallel_requests: 2\n", concurrency=8, max_retries=0
        )
        await client.complete("worker", ask(-1), max_tokens=8)
        server.reset()
        results = await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(12)),
            return_exceptions=True,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert server.max_in_flight == 2
        assert client.budget.calls == 1 + len(server.requests) == 13


async def test_a_paced_group_takes_its_slots_first_and_its_pace_is_no_timeout(tmp_path, caplog):
    # The Router caps a deployment with rpm 60 at 60 calls in progress; the
    # group takes its slots before each call, so nothing waits inside it.
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.05)) as server:
        client = router_client(
            tmp_path, server, "      rpm: 60\n      timeout: 1\n", concurrency=8, max_retries=0
        )
        with caplog.at_level(logging.DEBUG, logger="rlm_graph.models"):
            await client.complete("worker", ask(-1), max_tokens=8)
        assert WIRE_LOG not in caplog.text
        server.reset()
        results = await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(12)),
            return_exceptions=True,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert client.usage.timed_out_calls == 0
        assert client.budget.calls == 13 == 1 + len(server.requests)


async def test_a_long_queue_at_the_wire_is_no_timeout(caplog):
    # One slot, 0.45 s per request, a 0.5 s timeout: the last of 14 calls
    # waits about 6 s, past the timeout and the 5 s margin of the call's own
    # scope. Only the time at the server counts.
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.45)) as server:
        client = client_for(server, concurrency=1, timeout_s=0.5, max_retries=0)
        await warm(client, caplog)
        server.reset()
        results = await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(14)),
            return_exceptions=True,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert client.usage.timed_out_calls == 0
        assert len(server.requests) == 14


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


def test_loops_that_ended_leave_no_session_behind():
    from rlm_graph import _wire

    async def main() -> None:
        await session_for_this_loop()

    for _ in range(3):
        asyncio.run(main())
    # Each entry would hold its loop (and the session) alive.
    assert not [loop for loop in _wire._SESSIONS if loop.is_closed()]


async def test_one_session_per_loop():
    assert await session_for_this_loop() is await session_for_this_loop()


async def test_a_call_cancelled_while_waiting_at_the_wire_is_not_counted(caplog):
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.5)) as server:
        client = client_for(server, concurrency=1)
        await warm(client, caplog)
        server.reset()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rlm_graph.models"):
            tasks = [
                asyncio.create_task(client.complete("worker", ask(i), max_tokens=8))
                for i in range(3)
            ]
            await asyncio.sleep(0.2)
            tasks[1].cancel()
            tasks[2].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # The group still takes its slots at the wire: one more call, one more request.
            await client.complete("worker", ask(9), max_tokens=8)
        assert len(server.requests) == 2
        assert client.budget.calls == 3
        assert client.usage.calls == 3
        assert "without passing the slots" not in caplog.text


async def test_the_run_time_cutting_waits_at_the_wire_counts_no_unsent_call(caplog):
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.5)) as server:
        client = client_for(server, concurrency=1, max_time_s=1.5)
        await warm(client, caplog)
        await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(6)),
            return_exceptions=True,
        )
        assert client.usage.calls == client.budget.calls == len(server.requests)
        assert client.usage.timed_out_calls <= 1


async def test_a_paced_group_does_not_hold_up_another_group(tmp_path):
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.05)) as a, \
            FakeOpenAIServer(lambda r: Reply(content="y", latency_s=0.05)) as b:
        config = tmp_path / "router.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: slow\n    litellm_params:\n      model: openai/fake-a\n"
            f"      api_base: {a.api_base}\n      api_key: sk-fake-a\n      rpm: 60\n"
            "  - model_name: fast\n    litellm_params:\n      model: openai/fake-b\n"
            f"      api_base: {b.api_base}\n      api_key: sk-fake-b\n"
            "roles: {root: slow, worker: fast, judge: slow}\n"
        )
        client = ModelClient(RunConfig(router_config=str(config), context_window=4096, concurrency=4))
        await client.complete("root", ask("warm"), max_tokens=8)
        await client.complete("worker", ask("warm"), max_tokens=8)
        await asyncio.sleep(1.1)  # the slow group's bucket is full again
        started = time.monotonic()
        fast_done: list[float] = []

        async def fast(i: int) -> None:
            await client.complete("worker", ask(f"f{i}"), max_tokens=8)
            fast_done.append(time.monotonic() - started)

        slow = [client.complete("root", ask(f"s{i}"), max_tokens=8) for i in range(8)]
        await asyncio.gather(*slow, *(fast(i) for i in range(8)))
        # The slow group's eight calls take about 7 s at 60 rpm; the fast group's
        # go out beside them, not after them.
        assert max(fast_done) < 1.5, fast_done


async def test_no_request_leaves_while_its_quota_is_paused(caplog):
    times: list[float] = []
    lock = threading.Lock()
    state = {"armed": False, "limited": False}

    def respond(request):
        with lock:
            times.append(time.monotonic())
            if state["armed"] and not state["limited"]:
                state["limited"] = True
                return Reply(error="rate_limit", retry_after="2", latency_s=0.1)
        return Reply(content="x", latency_s=0.1)

    with FakeOpenAIServer(respond) as server:
        client = client_for(server, concurrency=3)
        await warm(client, caplog)
        state["armed"] = True
        times.clear()
        await asyncio.gather(*(client.complete("worker", ask(i), max_tokens=8) for i in range(12)))
        assert len(server.requests) == 1 + 1 + 12
        limited_at = times[0] + 0.1
        during_pause = [t - limited_at for t in times[1:] if limited_at + 0.05 < t < limited_at + 1.9]
        assert during_pause == [], during_pause


async def test_a_group_with_one_limited_deployment_refuses_nothing_and_counts_only_sent(tmp_path):
    # Found by a user test: the group's summed rpm is "no limit" when one
    # deployment has none, but the Router still caps the other deployment's
    # calls in progress (at its rpm) and refused calls waiting at the wire;
    # those refusals were counted as sent calls.
    with FakeOpenAIServer(lambda r: Reply(content="x", latency_s=0.1)) as server:
        config = tmp_path / "router.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: worker\n    litellm_params:\n      model: openai/d1\n"
            f"      api_base: {server.api_base}\n      api_key: sk-fake-1\n      rpm: 2\n"
            "  - model_name: worker\n    litellm_params:\n      model: openai/d2\n"
            f"      api_base: {server.api_base}\n      api_key: sk-fake-2\n"
        )
        client = ModelClient(RunConfig(router_config=str(config), context_window=4096, concurrency=8))
        await client.complete("worker", ask(-1), max_tokens=8)
        server.reset()
        results = await asyncio.gather(
            *(client.complete("worker", ask(i), max_tokens=8) for i in range(16)),
            return_exceptions=True,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert client.budget.calls == client.usage.calls == 1 + len(server.requests)
