"""Budgets stop a run cleanly with a partial answer; the dry run prices a plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlm_graph import ConfigError, RunConfig, arun
from rlm_graph.api import prepare
from rlm_graph.budget import Budget, estimate
from rlm_graph.cli import main
from rlm_graph.errors import BudgetExceeded
from rlm_graph.models import ModelClient
from rlm_graph.testing import Reply

from .conftest import count_reply, list_reply, numbered_paragraphs, text_reply

SETTINGS = {
    "model": "scripted/m",
    "context_window": 4096,
    "chunk_tokens": 200,
    "overlap_tokens": 16,
}
NAMES = ["Ada", "Brook", "Cyrus", "Delia", "Ezra", "Fern", "Gus", "Hal"]
QUESTION = "List every visitor named in the text."


@pytest.fixture
def visitors() -> str:
    needles = {
        i * 7 + 2: f"The visitor named {name} arrived." for i, name in enumerate(NAMES)
    }
    return numbered_paragraphs(60, needle_at=needles)


def assert_stopped_cleanly(result, text: str) -> None:
    assert result.status == "stopped"
    assert result.failures, "the tasks a budget left undone are reported"
    assert all(f.status == "stopped" and "budget" in f.reason for f in result.failures)
    for failure in result.failures:
        assert 0 <= failure.start < failure.end <= len(text)
    assert set(result.answer) < set(NAMES), (
        "the answer holds what was found before the stop"
    )


async def test_max_calls_stops_with_a_partial_answer(scripted, visitors):
    double = scripted(list_reply(r"The visitor named (\w+) arrived\."))
    result = await arun(QUESTION, text=visitors, max_calls=5, concurrency=2, **SETTINGS)

    assert_stopped_cleanly(result, visitors)
    assert len(double.requests) == 5 == result.usage.calls
    assert "max-calls budget of 5 calls" in result.stop_reason


async def test_max_tokens_is_never_exceeded_even_by_parallel_calls(scripted, visitors):
    scripted(list_reply(r"The visitor named (\w+) arrived\."))
    result = await arun(
        QUESTION, text=visitors, max_tokens=3000, concurrency=8, **SETTINGS
    )

    assert_stopped_cleanly(result, visitors)
    assert 0 < result.usage.prompt_tokens + result.usage.completion_tokens <= 3000


async def test_max_cost_with_user_given_prices(scripted, visitors):
    scripted(list_reply(r"The visitor named (\w+) arrived\."))
    # $100 per million tokens: about a cent per 100-token call.
    result = await arun(
        QUESTION,
        text=visitors,
        max_cost=0.1,
        price_in=100,
        price_out=100,
        concurrency=4,
        **SETTINGS,
    )

    assert_stopped_cleanly(result, visitors)
    assert 0 < result.usage.cost_usd <= 0.1 and result.usage.cost_known


async def test_max_time_stops_a_slow_run_on_time(scripted, visitors):
    def slow(request):
        return Reply(
            content=list_reply(r"The visitor named (\w+) arrived\.")(request),
            latency_s=0.4,
        )

    scripted(slow)
    started = time.monotonic()
    result = await arun(
        QUESTION, text=visitors, max_time_s=1.0, concurrency=2, **SETTINGS
    )
    elapsed = time.monotonic() - started

    assert_stopped_cleanly(result, visitors)
    assert elapsed < 1.0 + 1.5, f"stopped {elapsed:.1f} s after start"


async def test_without_a_budget_the_run_is_done(scripted, visitors):
    scripted(list_reply(r"The visitor named (\w+) arrived\."))
    result = await arun(QUESTION, text=visitors, **SETTINGS)
    assert (
        result.status == "done"
        and result.answer == NAMES
        and result.stop_reason is None
    )


def test_max_cost_with_an_unpriced_model_refuses_to_start():
    settings = {
        "model": "openai/some-private-model",
        "api_base": "http://127.0.0.1:9/v1",
    }
    # A first client's Router registers the model with an empty price entry
    # (K17); the model must still count as unpriced afterwards.
    assert ModelClient(RunConfig(**settings)).prices("worker") is None
    with pytest.raises(ConfigError, match="--price-in and --price-out"):
        ModelClient(RunConfig(**settings, max_cost=1.0))


def test_max_cost_with_a_priced_model_starts():
    client = ModelClient(RunConfig(model="openai/gpt-4o-mini", max_cost=1.0))
    assert client.prices("worker") is not None and client.prices("worker")[0] > 0


def test_local_models_cost_nothing():
    client = ModelClient(RunConfig(model="local/smollm2-135m", max_cost=0.01))
    assert client.prices("worker") == (0.0, 0.0)


def test_budget_refuses_every_attempt_after_the_first_stop():
    budget = Budget(RunConfig(max_calls=2))
    budget.settle(budget.reserve(10, 0.0), 10, 0.0)
    budget.settle(budget.reserve(10, 0.0), 10, 0.0)
    with pytest.raises(BudgetExceeded, match="max-calls"):
        budget.reserve(10, 0.0)
    with pytest.raises(BudgetExceeded, match="max-calls"):
        budget.reserve(1, 0.0)
    assert budget.calls == 2 and budget.is_stopped


def test_budget_holds_in_flight_reservations():
    budget = Budget(RunConfig(max_tokens=100))
    held = budget.reserve(60, 0.0)
    with pytest.raises(BudgetExceeded, match="max-tokens"):
        budget.reserve(60, 0.0)
    budget.settle(held, 30, 0.0)
    assert budget.tokens == 30


async def test_dry_run_estimate_matches_a_clean_run(scripted, visitors):
    double = scripted(list_reply(r"The visitor named (\w+) arrived\."))
    engine = prepare(QUESTION, text=visitors, **SETTINGS)
    figures = estimate(engine)
    assert double.requests == [], "a dry run calls no model"

    result = await arun(QUESTION, text=visitors, **SETTINGS)
    assert figures.calls == figures.leaf_calls == result.usage.calls
    assert figures.pieces == figures.leaf_calls and figures.merge_calls == 0
    # What the provider counts (the double reports cl100k counts): the safety
    # margin the worker's tokenizer adds for fitting windows is left out.
    assert figures.prompt_tokens == pytest.approx(result.usage.prompt_tokens, rel=0.05)
    # The estimate counts the whole output allowance: an upper bound.
    assert figures.completion_tokens >= result.usage.completion_tokens
    assert figures.cost_usd is None, "the scripted model has no price"


def test_dry_run_cli_prints_the_plan_and_calls_nothing(scripted, visitors, tmp_path):
    double = scripted(list_reply(r"The visitor named (\w+) arrived\."))
    path = tmp_path / "book.txt"
    path.write_text(visitors)
    args = [
        "run",
        str(path),
        "-q",
        QUESTION,
        "--model",
        "scripted/m",
        "--context-window",
        "4096",
        "--chunk-tokens",
        "200",
        "--dry-run",
        "--price-in",
        "2",
        "--price-out",
        "8",
    ]
    human = CliRunner().invoke(main, args)
    as_json = CliRunner().invoke(main, [*args, "--json"])

    assert human.exit_code == 0, human.output
    assert (
        "pieces:" in human.stdout
        and "calls:" in human.stdout
        and "cost:" in human.stdout
    )
    data = json.loads(as_json.stdout)
    assert (
        data["pieces"] > 1 and data["calls"] >= data["pieces"] and data["cost_usd"] > 0
    )
    assert double.requests == []


def test_cli_budget_stop_exits_1_and_says_why(scripted, visitors, tmp_path):
    scripted(list_reply(r"The visitor named (\w+) arrived\."))
    path = tmp_path / "book.txt"
    path.write_text(visitors)
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(path),
            "-q",
            QUESTION,
            "--model",
            "scripted/m",
            "--context-window",
            "4096",
            "--chunk-tokens",
            "200",
            "--max-calls",
            "3",
            "--concurrency",
            "1",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "max-calls budget of 3 calls reached" in result.stderr
    assert "Traceback" not in result.output


def test_cli_max_cost_without_prices_is_a_one_line_error(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("some text")
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(path),
            "-q",
            "What?",
            "--model",
            "openai/private-thing",
            "--api-base",
            "http://127.0.0.1:9/v1",
            "--max-cost",
            "1",
        ],
    )
    assert result.exit_code == 2
    assert (
        "--price-in" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )


BOOK = Path(__file__).parent.parent / "examples" / "alice_in_wonderland.txt"
QUICKSTART = "What were the names of the three sisters in the Dormouse's story?"
# The embedded model's span size, as in the README's quickstart.
BOOK_SETTINGS = {"model": "scripted/m", "context_window": 8192, "chunk_tokens": 1500}


@pytest.mark.parametrize(
    ("question", "responder", "extra"),
    [
        (QUICKSTART, text_reply(r"names were ([^;]+);"), {}),
        (QUICKSTART, text_reply(r"names were ([^;]+);"), {"filter": "sisters"}),
        (
            "How many times does someone shout 'Off with her head'?",
            count_reply(r"Off with (?:her|his|their) heads?"),
            {},
        ),
    ],
    ids=["quickstart", "quickstart-filtered", "count"],
)
async def test_dry_run_prompt_tokens_are_within_20_percent_of_the_run(
    scripted, tmp_path, question, responder, extra
):
    double = scripted(responder)
    text = BOOK.read_text(encoding="utf-8")
    settings = {**BOOK_SETTINGS, **extra}
    figures = estimate(prepare(question, text=text, **settings))
    result = await arun(question, text=text, store=tmp_path / "s.sqlite", **settings)

    assert result.status == "done" and result.found
    assert result.usage.calls == len(double.requests) <= figures.calls
    sent = result.usage.prompt_tokens
    assert abs(figures.prompt_tokens - sent) <= 0.2 * sent, (figures, sent)
    # Merges only happen where two pieces found something: the bound holds.
    assert sent <= figures.prompt_tokens + figures.merge_prompt_tokens


async def test_dry_run_counts_the_planning_call(scripted, tmp_path):
    def respond(request):
        if "plan how to read" in request.prompt:
            return json.dumps(
                {
                    "kind": "text",
                    "sub_question": QUICKSTART,
                    "chunk_tokens": 0,
                    "filter": "",
                }
            )
        return text_reply(r"names were ([^;]+);")(request)

    double = scripted(respond)
    text = BOOK.read_text(encoding="utf-8")
    settings = {**BOOK_SETTINGS, "planner": "model"}
    figures = estimate(prepare(QUICKSTART, text=text, **settings))
    result = await arun(QUICKSTART, text=text, store=tmp_path / "s.sqlite", **settings)

    planning = [r for r in double.requests if "plan how to read" in r.prompt]
    assert figures.plan_calls == len(planning) == 1
    assert result.usage.calls == figures.plan_calls + figures.leaf_calls
    assert figures.prompt_tokens == pytest.approx(result.usage.prompt_tokens, rel=0.02)
