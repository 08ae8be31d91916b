"""Fault storm: 500 leaf calls over HTTP, 30 % of first attempts fail, nothing is lost.

The failures are acted out by the HTTP double (FakeOpenAIServer), chosen by a
hash of each prompt so the storm is the same on every run. Everything the
engine does about them (retry, re-ask, more output room, split finer) is the
product logic under test.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

from rlm_graph import arun
from rlm_graph.nodes.plan import MIN_LEAF_TOKENS
from rlm_graph.testing import FakeOpenAIServer, ModelRequest, Reply
from rlm_graph.tokens import token_counter

from .conftest import excerpt_of, list_reply, numbered_paragraphs

QUESTION = "List every visitor named in the text."
FAIL_PER_MILLE = 300
KINDS = (
    "rate_limit",
    "server_error",
    "timeout",
    "empty",
    "truncated",
    "malformed",
    "context",
)
SETTINGS = {
    "context_window": 4096,
    "chunk_tokens": 200,
    "overlap_tokens": 8,
    "max_depth": 12,
    "concurrency": 24,
    "timeout_s": 0.5,
    "max_retries": 3,
    "api_key": "sk-storm-key",
}


def book() -> str:
    needles = {
        i * 14 + 5: f"The visitor named Guest{i:03d} arrived." for i in range(70)
    }
    return numbered_paragraphs(1000, needle_at=needles, words=60)


class Storm:
    """A responder: the clean answer, or on a prompt's first attempt a failure."""

    def __init__(self) -> None:
        self.clean = list_reply(r"The visitor named (\w+) arrived\.")
        self.count = token_counter("openai/fake-model")
        self.seen: set[str] = set()
        self.first_attempts = 0
        self.injected: Counter[str] = Counter()
        self.context_prompts: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, request: ModelRequest) -> Reply | str:
        excerpt = excerpt_of(request)
        with self._lock:
            first = request.prompt not in self.seen
            self.seen.add(request.prompt)
        if request.prompt in self.context_prompts:
            return Reply(error="context_window")  # the same prompt is refused again
        # A re-ask carries the reason of the failure before it: it is a second
        # attempt of its task, not a first one.
        if (
            excerpt is None
            or not first
            or "previous reply was rejected" in request.prompt
        ):
            return self.clean(request)

        digest = int(hashlib.sha256(request.prompt.encode()).hexdigest()[:12], 16)
        with self._lock:
            self.first_attempts += 1
        if digest % 1000 >= FAIL_PER_MILLE:
            return self.clean(request)
        kind = KINDS[(digest // 1000) % len(KINDS)]
        if kind == "context" and self.count(excerpt) < 2 * MIN_LEAF_TOKENS:
            kind = (
                "server_error"  # too small to split: the server would not say so either
            )
        with self._lock:
            self.injected[kind] += 1
        return self._failure(kind, request)

    def _failure(self, kind: str, request: ModelRequest) -> Reply:
        if kind == "rate_limit":
            return Reply(error="rate_limit", retry_after="0.2")
        if kind in ("server_error", "timeout"):
            return Reply(error=kind)
        if kind == "empty":
            return Reply(content="")
        if kind == "truncated":
            return Reply(content='{"items": [{"item": "Gue', finish_reason="length")
        if kind == "malformed":
            return Reply(content="Sure! Here are the visitors: {items: [oops")
        self.context_prompts.add(request.prompt)
        return Reply(error="context_window")


async def test_fault_storm_answer_equals_the_clean_run(tmp_path):
    text = book()
    clean_responder = list_reply(r"The visitor named (\w+) arrived\.")
    with FakeOpenAIServer(clean_responder) as server:
        clean = await arun(
            QUESTION,
            text=text,
            model="openai/fake-model",
            api_base=server.api_base,
            store=tmp_path / "clean.sqlite",
            **SETTINGS,
        )
        clean_attempts = len(server.requests)

    storm = Storm()
    with FakeOpenAIServer(storm) as server:
        stormy = await arun(
            QUESTION,
            text=text,
            model="openai/fake-model",
            api_base=server.api_base,
            # A store of its own: the clean run's call log would answer every call.
            store=tmp_path / "storm.sqlite",
            **SETTINGS,
        )
        attempts = len(server.requests)
        resent_context = [
            p for p in storm.context_prompts if server.calls_per_prompt[p] > 1
        ]

    injected = sum(storm.injected.values())
    assert clean.status == "done" and clean_attempts >= 500, (
        "the storm needs 500 leaf calls"
    )
    assert 0.25 <= injected / storm.first_attempts <= 0.35
    assert set(storm.injected) == set(KINDS), storm.injected

    assert stormy.status == "done" and stormy.failures == []
    assert stormy.answer == clean.answer and len(clean.answer) == 70
    assert resent_context == [], "a prompt refused for its size is never sent again"
    # Every attempt the server saw is a call, and every injected timeout a timed-out
    # call. On loaded cores a clean attempt can time out too, even before the
    # server reads it: the only calls the server never saw are such timeouts.
    unseen = stormy.usage.calls - attempts
    extra_timeouts = stormy.usage.timed_out_calls - storm.injected["timeout"]
    assert 0 <= unseen <= extra_timeouts, (unseen, extra_timeouts)
    # The stated bound: each injected failure costs one extra attempt (a
    # retry, a re-ask or a retry with more room), except a context error,
    # which costs the refused call plus up to three finer pieces in place of
    # the one clean call: at most clean + injected + 3 x context errors.
    bound = clean_attempts + injected + 3 * storm.injected["context"]
    assert attempts <= bound, (attempts, clean_attempts, storm.injected)
    print(
        f"\nfault storm: clean {clean_attempts} attempts; storm {attempts} attempts, "
        f"{injected} injected failures of {storm.first_attempts} first attempts "
        f"({dict(storm.injected)})"
    )
