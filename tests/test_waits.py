"""Waits of a model call end with the run's time; budgets, keys and limits fail clearly.

Uses the HTTP double (FakeOpenAIServer) with short real waits.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time

import pytest
import yaml
from click.testing import CliRunner

from rlm_graph import ConfigError, RunConfig, arun
from rlm_graph.budget import Budget
from rlm_graph.cli import main
from rlm_graph.errors import BudgetExceeded, ModelCallError
from rlm_graph.models import ModelClient, retry_after_seconds
from rlm_graph.testing import FakeOpenAIServer, Reply

from .conftest import list_reply, numbered_paragraphs

KEY = "sk-fake-waits-key"


def ask(text: str = "hello there") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def router_file(tmp_path, server: FakeOpenAIServer, **params) -> object:
    path = tmp_path / "router.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "worker",
                        "litellm_params": {
                            "model": "openai/m",
                            "api_base": server.api_base,
                            "api_key": KEY,
                            **params,
                        },
                        "model_info": {"max_input_tokens": 8192},
                    }
                ]
            }
        )
    )
    return path


async def test_rpm_pacing_wait_ends_when_the_run_time_is_up(tmp_path):
    with FakeOpenAIServer(lambda r: "ok") as server:
        client = ModelClient(
            RunConfig(router_config=router_file(tmp_path, server, rpm=1), max_time_s=6)
        )
        await client.complete("worker", ask("first"), max_tokens=8)
        left = client.budget.remaining_s()
        started = time.monotonic()
        with pytest.raises(BudgetExceeded, match="max-time"):
            # rpm 1: the next request may go only a minute later.
            await client.complete("worker", ask("second"), max_tokens=8)
        waited = time.monotonic() - started

    assert len(server.requests) == 1
    assert waited < left + 1.0, f"waited {waited:.1f} s with {left:.1f} s left"


async def test_tpm_below_one_calls_worst_case_sends_it_alone_then_stops_on_time(
    tmp_path,
):
    with FakeOpenAIServer(lambda r: "ok") as server:
        client = ModelClient(
            RunConfig(router_config=router_file(tmp_path, server, tpm=60), max_time_s=6)
        )
        # ~100 tokens against 60 a minute: sent at once (not after the ~100 s a
        # bucket without debt would need), the bucket goes into debt.
        await client.complete("worker", ask("word " * 90), max_tokens=8)
        left = client.budget.remaining_s()
        started = time.monotonic()
        with pytest.raises(BudgetExceeded, match="max-time"):
            await client.complete("worker", ask("other " * 90), max_tokens=8)
        waited = time.monotonic() - started

    assert len(server.requests) == 1
    assert waited < left + 1.0, f"waited {waited:.1f} s with {left:.1f} s left"


async def test_a_run_paced_past_its_time_ends_stopped_with_its_partial_answer(tmp_path):
    names = ["Ada", "Brook", "Cyrus", "Delia"]
    text = numbered_paragraphs(
        40,
        needle_at={
            i * 9 + 2: f"The visitor named {n} arrived." for i, n in enumerate(names)
        },
    )
    with FakeOpenAIServer(list_reply(r"The visitor named (\w+) arrived\.")) as server:
        started = time.monotonic()
        result = await arun(
            "List every visitor named in the text.",
            text=text,
            router_config=router_file(tmp_path, server, rpm=1),
            chunk_tokens=200,
            planner="rules",
            max_time_s=5.0,
            concurrency=4,
        )
        elapsed = time.monotonic() - started

    assert result.status == "stopped"
    assert "max-time" in result.stop_reason
    assert len(server.requests) == 1
    assert elapsed < 8.0, f"the run ended {elapsed:.1f} s after start"


async def test_a_retry_after_longer_than_the_time_left_stops_at_once(tmp_path):
    with FakeOpenAIServer(
        lambda r: Reply(error="rate_limit", retry_after="60")
    ) as server:
        client = ModelClient(
            RunConfig(router_config=router_file(tmp_path, server), max_time_s=8)
        )
        started = time.monotonic()
        with pytest.raises(BudgetExceeded, match="max-time"):
            await client.complete("worker", ask(), max_tokens=8)
        elapsed = time.monotonic() - started

    assert len(server.requests) == 1
    assert elapsed < 3.0, f"waited {elapsed:.1f} s of a 60 s Retry-After"


async def test_a_retry_after_http_date_is_honoured(tmp_path):
    replies = iter(
        [
            Reply(
                error="rate_limit",
                retry_after=email.utils.formatdate(time.time() + 3, usegmt=True),
            )
        ]
    )

    def respond(request):
        return next(replies, "ok")

    with FakeOpenAIServer(respond) as server:
        client = ModelClient(RunConfig(router_config=router_file(tmp_path, server)))
        completion = await client.complete("worker", ask(), max_tokens=8)
        first, second = (r.received_at for r in server.requests)

    assert completion.text == "ok"
    # An HTTP date has whole seconds: 3 s ahead is at least 2 s after the 429.
    assert second - first >= 1.9, f"retried {second - first:.2f} s after the 429"


def test_a_retry_after_date_counts_from_the_responses_own_date():
    headers = {
        "date": "Fri, 04 Dec 2026 10:00:00 GMT",
        "retry-after": "Fri, 04 Dec 2026 10:00:30 GMT",
    }
    # The local clock is an hour off; the server's own Date header is the base.
    assert retry_after_seconds(headers, now=0.0) == 30.0
    assert retry_after_seconds({"retry-after": "600"}) == 120.0


async def test_budget_waits_for_calls_in_flight_instead_of_stopping():
    budget = Budget(RunConfig(max_tokens=100))
    held = budget.reserve(60, 0.0)  # in flight, worst case 60
    waiting = asyncio.create_task(budget.admit(60, 0.0))
    await asyncio.sleep(0.05)
    assert not waiting.done() and not budget.is_stopped
    budget.settle(held, 30, 0.0)  # it spent 30: 30 + 60 fits
    reservation = await asyncio.wait_for(waiting, 1.0)
    budget.settle(reservation, 40, 0.0)
    assert budget.tokens == 70
    # Nothing in flight and the worst case does not fit what is left: stop.
    with pytest.raises(BudgetExceeded, match="max-tokens"):
        await budget.admit(31, 0.0)


async def test_a_budget_wait_for_calls_in_flight_ends_with_the_time():
    budget = Budget(RunConfig(max_tokens=100, max_time_s=0.3))
    budget.reserve(60, 0.0)
    with pytest.raises(BudgetExceeded, match="max-time"):
        await asyncio.wait_for(budget.admit(60, 0.0), 2.0)


async def test_a_rejected_key_fails_at_once_without_retries(tmp_path):
    with FakeOpenAIServer(lambda r: Reply(error="auth")) as server:
        client = ModelClient(
            RunConfig(router_config=router_file(tmp_path, server), max_retries=5)
        )
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(client.complete("worker", ask(f"q{i}"), max_tokens=8) for i in range(4)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        sent = len(server.requests)
        # A later call is not sent at all.
        with pytest.raises(ModelCallError, match="rejected the API key"):
            await client.complete("worker", ask("later"), max_tokens=8)
        assert len(server.requests) == sent

    assert all(isinstance(o, ModelCallError) for o in outcomes)
    assert all("rejected the API key" in str(o) for o in outcomes)
    assert sent <= 4, f"{sent} requests for 4 calls with a rejected key"
    assert elapsed < 3.0, f"a rejected key took {elapsed:.1f} s to fail"


@pytest.mark.parametrize(
    ("params", "shown"),
    [
        ({"rpm": "fast"}, "rpm: 'fast'"),
        ({"rpm": -5}, "rpm: -5"),
        ({"tpm": 0}, "tpm: 0"),
        ({"max_parallel_requests": 1.5}, "max_parallel_requests: 1.5"),
        ({"timeout": 0}, "timeout: 0"),
        ({"timeout": "slow"}, "timeout: 'slow'"),
    ],
    ids=[
        "rpm-text",
        "rpm-negative",
        "tpm-zero",
        "parallel-fraction",
        "timeout-zero",
        "timeout-text",
    ],
)
def test_unusable_limits_are_refused_naming_the_deployment(tmp_path, params, shown):
    with FakeOpenAIServer(lambda r: "ok") as server:
        path = router_file(tmp_path, server, **params)
        with pytest.raises(ConfigError, match="deployment 'worker'") as caught:
            ModelClient(RunConfig(router_config=path))
    assert shown in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_refuses_a_non_numeric_rpm_with_exit_2(tmp_path):
    with FakeOpenAIServer(lambda r: "ok") as server:
        path = router_file(tmp_path, server, rpm="fast")
        (tmp_path / "doc.txt").write_text("Some text. " * 50)
        result = CliRunner().invoke(
            main,
            [
                "run",
                str(tmp_path / "doc.txt"),
                "-q",
                "What?",
                "--router-config",
                str(path),
                "--store",
                str(tmp_path / "s.sqlite"),
            ],
        )
    assert result.exit_code == 2, result.output
    assert "rpm: 'fast'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_cli_rejected_key_exits_3_and_json_prints_the_failure(tmp_path, debug):
    with FakeOpenAIServer(lambda r: Reply(error="auth")) as server:
        path = router_file(tmp_path, server)
        (tmp_path / "doc.txt").write_text("Some text. " * 50)
        result = CliRunner().invoke(
            main,
            [
                "run",
                str(tmp_path / "doc.txt"),
                "-q",
                "What?",
                "--router-config",
                str(path),
                "--store",
                str(tmp_path / "s.sqlite"),
                "--planner",
                "rules",
                "--json",
                *(["--debug"] if debug else []),
            ],
        )
    assert result.exit_code == 3, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "failed"
    assert "rejected the API key" in data["error"]
    assert KEY not in result.stdout + result.stderr


async def test_usage_counts_each_paid_call_once_across_resumes(tmp_path):
    from rlm_graph import api

    text = numbered_paragraphs(40, needle_at={5: "The visitor named Ada arrived."})
    store = str(tmp_path / "s.sqlite")
    with FakeOpenAIServer(list_reply(r"The visitor named (\w+) arrived\.")) as server:
        settings = {
            "model": "openai/m",
            "api_base": server.api_base,
            "api_key": KEY,
            "context_window": 4096,
            "chunk_tokens": 200,
            "planner": "rules",
            "concurrency": 2,
        }
        first = await api.arun(
            "List every visitor named in the text.",
            text=text,
            store=store,
            run_id="counted",
            max_calls=3,
            **settings,
        )
        second = await api.aresume("counted", store=store, max_calls=3, api_key=KEY)
        third = await api.aresume("counted", store=store, max_calls=10_000, api_key=KEY)
        sent = len(server.requests)

    assert first.status == second.status == "stopped"
    assert third.status == "done"
    assert third.answer == ["Ada"]
    # Replays of calls earlier sessions paid for are neither paid nor cached again.
    assert third.usage.calls == sent
    assert third.usage.cached_calls == 0


async def test_a_capped_retry_after_says_so_and_the_pause_names_each_server_once(
    caplog,
):
    with FakeOpenAIServer(
        lambda r: Reply(error="rate_limit", retry_after="600")
    ) as server:
        api_base = server.api_base
        # Flags: root, worker and judge are three deployments of one model and server.
        client = ModelClient(
            RunConfig(
                model="openai/m", api_base=server.api_base, api_key=KEY, max_time_s=5
            )
        )
        with (
            caplog.at_level(logging.INFO, logger="rlm_graph"),
            pytest.raises(BudgetExceeded, match="max-time"),
        ):
            await client.complete("worker", ask(), max_tokens=8)

    pauses = [
        m for r in caplog.records if "after a rate limit" in (m := r.getMessage())
    ]
    assert len(pauses) == 1
    assert "Retry-After asked 600 s; capped at 120 s" in pauses[0]
    waiting = pauses[0].rpartition(": ")[2]
    assert waiting.count(api_base) == 1, pauses[0]


def test_log_records_are_single_lines_when_stderr_is_not_a_terminal(capsys):
    from rlm_graph.cli import _configure_logging

    _configure_logging(1, False)
    try:
        logging.getLogger("rlm_graph.models").info(
            "first line\nsecond line %s", "x" * 200
        )
    finally:
        logging.getLogger().handlers.clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("INFO") and lines[0].endswith("x" * 200)
    assert "first line | second line" in lines[0]


async def test_a_slot_taken_as_its_wait_is_abandoned_is_given_back():
    budget = Budget(RunConfig(max_time_s=0.2))
    slots = asyncio.Semaphore(1)
    await slots.acquire()  # held elsewhere: the wait below times out
    with pytest.raises(BudgetExceeded, match="max-time"):
        await budget.within_time(slots.acquire(), slots.release)
    slots.release()
    await asyncio.sleep(0.05)
    assert not slots.locked(), "the abandoned wait kept a slot"
    # A caller cancelled while waiting gives its slot back too.
    open_budget = Budget(RunConfig())
    await slots.acquire()
    waiter = asyncio.create_task(
        open_budget.within_time(slots.acquire(), slots.release)
    )
    await asyncio.sleep(0.05)
    waiter.cancel()
    slots.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0.05)
    assert not slots.locked()


async def test_a_budget_reached_by_another_call_ends_every_open_wait_at_once():
    budget = Budget(RunConfig(max_time_s=30))
    slots = asyncio.Semaphore(1)
    await slots.acquire()  # held: both waits below block
    waits = [
        asyncio.create_task(budget.within_time(slots.acquire(), slots.release)),
        asyncio.create_task(budget.within_time(asyncio.sleep(20))),
    ]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    budget.stop("max-calls", "3")
    for wait in waits:
        with pytest.raises(BudgetExceeded, match="max-calls budget of 3"):
            await wait
    assert time.monotonic() - started < 1.0
    slots.release()
    assert not slots.locked(), "a wait ended by the stop kept a slot"


async def test_a_ready_wait_is_still_refused_after_a_stop():
    budget = Budget(RunConfig())
    budget.stop("max-tokens", "100")
    slots = asyncio.Semaphore(1)
    with pytest.raises(BudgetExceeded, match="max-tokens"):
        await budget.within_time(slots.acquire(), slots.release, ready=True)
    assert not slots.locked(), "a refused wait took a slot"


async def test_user_given_prices_reach_litellm_so_its_cost_equals_ours():
    import litellm

    with FakeOpenAIServer(lambda request: Reply(content="hi there")) as server:
        client = ModelClient(RunConfig(
            model="openai/priced-by-flags", api_base=server.api_base, api_key=KEY,
            context_window=4096, price_in=2.0, price_out=8.0,
        ))
        seen: list[float] = []

        class Spy(litellm.integrations.custom_logger.CustomLogger):
            async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
                seen.append(kwargs.get("response_cost"))

        spy = Spy()
        litellm.callbacks.append(spy)
        try:
            completion = await client.complete("worker", ask(), max_tokens=8)
            for _ in range(50):
                if seen:
                    break
                await asyncio.sleep(0.02)
        finally:
            litellm.callbacks.remove(spy)
    expected = completion.prompt_tokens * 2.0e-6 + completion.completion_tokens * 8.0e-6
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0
    assert completion.cost_usd == pytest.approx(expected)
    assert seen and seen[0] == pytest.approx(expected), seen
