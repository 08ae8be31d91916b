"""Durable runs: kill -9 and resume, failed branches, refusals, on SQLite and PostgreSQL.

The model is the loopback HTTP double (:class:`FakeOpenAIServer`) running in this
test process; the run is a separate ``python -m rlm_graph`` process, so it can be
killed with SIGKILL while the double keeps counting what it was asked, per prompt.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rlm_graph import api
from rlm_graph.errors import ResumeMismatchError, RunBusyError, StoreError
from rlm_graph.store import open_store
from rlm_graph.testing import FakeOpenAIServer, ModelRequest, Reply
from tests.conftest import excerpt_of, numbered_paragraphs

ITEM = re.compile(r"Paragraph (\d+)\.")
CONCURRENCY = 8


def item_reply(latency_s: float = 0.0, fail_marker: str | None = None, failing: threading.Event | None = None):
    """A reader double for list questions: lists each 'Paragraph N.' in the excerpt.

    With ``fail_marker``, a leaf whose excerpt holds that text gets a 400 error
    (not retryable) while ``failing`` is set.
    """

    def respond(request: ModelRequest) -> Reply:
        excerpt = excerpt_of(request) or ""
        if fail_marker and failing is not None and failing.is_set() and fail_marker in excerpt:
            return Reply(error="bad_request", latency_s=latency_s)
        items = [{"item": f"paragraph {m.group(1)}", "quote": m.group(0)} for m in ITEM.finditer(excerpt)]
        return Reply(content=json.dumps({"items": items}), latency_s=latency_s)

    return respond


def model_flags(server: FakeOpenAIServer) -> list[str]:
    return [
        "--model", "openai/fake-model", "--api-base", server.api_base,
        "--context-window", "4096", "--concurrency", str(CONCURRENCY),
    ]


def resume_flags(server: FakeOpenAIServer) -> list[str]:
    return ["--api-base", server.api_base, "--concurrency", str(CONCURRENCY)]


RUN_FLAGS = ["--kind", "list", "--chunk-tokens", "64", "--overlap-tokens", "0", "--max-depth", "4"]
QUESTION = "Which paragraphs are there?"


def cli(*args: str, store: str) -> list[str]:
    return [sys.executable, "-m", "rlm_graph", *args, "--store", store]


def start(command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Ctrl-C not ignored in the child, as an interactive shell starts it.
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def kill_when(proc: subprocess.Popen[str], server: FakeOpenAIServer, requests: int) -> int:
    """SIGKILL ``proc`` once the double has received ``requests`` requests; return
    how many requests were in flight at that moment."""
    # A stall, not slowness, fails the test: the 120 s restart with every request
    # the double receives (under load a whole run to the kill point can take longer).
    seen = len(server.requests)
    deadline = time.monotonic() + 120
    while (received := len(server.requests)) < requests:
        if received > seen:
            seen, deadline = received, time.monotonic() + 120
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill point:\n{proc.stderr.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            proc.kill()
            _, errors = proc.communicate()
            pytest.fail(
                f"the run made no progress for 120 s after {received} requests; "
                f"its stderr ends:\n{errors[-2000:]}"
            )
        time.sleep(0.002)
    in_flight = server.in_flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return in_flight


def finish(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=os.environ)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "runs.sqlite")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def book(tmp_path: Path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(numbered_paragraphs(320, words=30), encoding="utf-8")
    return path


def test_killed_run_resumes_without_paying_twice(store_url: str, book: Path, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with FakeOpenAIServer(item_reply(latency_s=0.02)) as reference_server:
        reference = finish(cli(
            "run", str(book), "-q", QUESTION, "--json", *RUN_FLAGS, *model_flags(reference_server),
            store=str(tmp_path / "reference.sqlite"),
        ))
        leaf_calls = len(reference_server.requests)
    assert reference["status"] == "done"
    assert leaf_calls >= 300, leaf_calls

    kill_points = sorted(rng.sample(range(20, leaf_calls - 20), 3))
    with FakeOpenAIServer(item_reply(latency_s=0.02)) as server:
        flags = [*RUN_FLAGS, *model_flags(server)]
        in_flight = [kill_when(start(cli(
            "run", str(book), "-q", QUESTION, "--run-id", "killed", *flags, store=store_url,
        )), server, kill_points[0])]
        for point in kill_points[1:]:
            in_flight.append(kill_when(
                start(cli("resume", "killed", *resume_flags(server), store=store_url)), server, point,
            ))
        final = finish(cli("resume", "killed", "--json", *resume_flags(server), store=store_url))

    assert final["answer"] == reference["answer"], f"seed {seed}"
    assert final["status"] == "done"
    repeats = Counter({p: n - 1 for p, n in server.calls_per_prompt.items() if n > 1})
    note = f"seed {seed}, kills after {kill_points} requests, in flight {in_flight}, repeats {sum(repeats.values())}"
    # Only calls in flight at a kill are sent again: at most the concurrency limit per kill.
    assert sum(repeats.values()) <= CONCURRENCY * len(kill_points), note
    assert all(n <= len(kill_points) for n in repeats.values()), note
    assert len(server.calls_per_prompt) == leaf_calls, note


async def test_failed_branch_is_the_only_call_made_on_resume(store_url: str, book: Path) -> None:
    failing = threading.Event()
    failing.set()
    with FakeOpenAIServer(item_reply(fail_marker="Paragraph 123.", failing=failing)) as server:
        settings = {
            "model": "openai/fake-model", "api_base": server.api_base, "context_window": 4096,
            "kind": "list", "chunk_tokens": 64, "overlap_tokens": 0,
        }
        first = await api.arun(QUESTION, [book], store=store_url, run_id="branch", **settings)
        assert first.status == "partial"
        assert len(first.failures) == 1
        assert "paragraph 123" not in first.answer
        assert "paragraph 122" in first.answer and "paragraph 124" in first.answer
        sent_before = len(server.requests)

        failing.clear()
        second = await api.aresume("branch", store=store_url, api_base=server.api_base)
        new_requests = server.requests[sent_before:]

    assert second.status == "done"
    assert len(new_requests) == 1
    assert "Paragraph 123." in new_requests[0].prompt
    assert "paragraph 123" in second.answer
    assert second.answer == sorted(second.answer, key=lambda s: int(s.split()[1]))


async def test_same_question_again_is_answered_from_the_call_log(tmp_path: Path, book: Path) -> None:
    store = str(tmp_path / "s.sqlite")
    with FakeOpenAIServer(item_reply()) as server:
        settings = {
            "model": "openai/fake-model", "api_base": server.api_base, "context_window": 4096,
            "kind": "list", "chunk_tokens": 64,
        }
        first = await api.arun(QUESTION, [book], store=store, **settings)
        sent = len(server.requests)
        second = await api.arun(QUESTION, [book], store=store, **settings)

    assert len(server.requests) == sent
    assert second.answer == first.answer
    assert second.usage.calls == 0
    assert second.usage.cached_calls == first.usage.calls > 300
    assert second.run_id != first.run_id


@pytest.fixture
def finished_run(tmp_path: Path, book: Path) -> tuple[str, FakeOpenAIServer]:
    store = str(tmp_path / "s.sqlite")
    server = FakeOpenAIServer(item_reply(fail_marker="Paragraph 7.", failing=_always()))
    server.start()
    api.run(
        QUESTION, [book], store=store, run_id="one", model="openai/fake-model",
        api_base=server.api_base, context_window=4096, kind="list", chunk_tokens=64,
    )
    yield store, server
    server.stop()


def _always() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


async def test_resume_refuses_another_question(finished_run: tuple[str, Any]) -> None:
    store, server = finished_run
    with pytest.raises(ResumeMismatchError, match="asked 'Which paragraphs are there\\?', not 'Who\\?'"):
        await api.aresume("one", store=store, question="Who?", api_base=server.api_base)


async def test_resume_refuses_a_changed_setting_and_names_it(finished_run: tuple[str, Any]) -> None:
    store, server = finished_run
    with pytest.raises(ResumeMismatchError, match="chunk_tokens: run has 64, asked 128"):
        await api.aresume("one", store=store, chunk_tokens=128, api_base=server.api_base)


async def test_resume_refuses_an_edited_source_file(finished_run: tuple[str, Any], book: Path) -> None:
    store, server = finished_run
    book.write_text(book.read_text().replace("Paragraph 5.", "Paragraph five."))
    with pytest.raises(ResumeMismatchError, match="book.txt changed since run one started"):
        await api.aresume("one", store=store, api_base=server.api_base)
    # The stored copy still finishes the question as it was first asked.
    result = await api.aresume("one", store=store, api_base=server.api_base, stored_source=True)
    assert "paragraph 5" in result.answer


async def test_two_resumes_at_once_one_is_told_busy(store_url: str, book: Path) -> None:
    with FakeOpenAIServer(item_reply(latency_s=0.05)) as server:
        settings = {
            "model": "openai/fake-model", "api_base": server.api_base, "context_window": 4096,
            "kind": "list", "chunk_tokens": 64,
        }
        # Make the run exist, then hold its lock the way a running process does.
        async with open_store(store_url) as store:
            engine = api.prepare(QUESTION, [book], **settings)
            record = await api._new_record(engine, store, "busy")
            await store.save_run(record)
            async with store.lock_run("busy"):
                other = subprocess.run(
                    cli("resume", "busy", *resume_flags(server), store=store_url),
                    capture_output=True, text=True, timeout=120,
                )
                with pytest.raises(RunBusyError):
                    await api.aresume("busy", store=store_url, api_base=server.api_base)
                runs = await store.list_runs()
    assert other.returncode == 2, other.stderr
    assert "Run busy is busy: another process is running or resuming it" in other.stderr
    assert "Traceback" not in other.stderr
    assert [r.status for r in runs if r.run_id == "busy"] == ["running"]


def test_killed_run_shows_interrupted_and_its_progress(tmp_path: Path, book: Path) -> None:
    store = str(tmp_path / "s.sqlite")
    with FakeOpenAIServer(item_reply(latency_s=0.02)) as server:
        proc = start(cli("run", str(book), "-q", QUESTION, "--run-id", "shown", *RUN_FLAGS,
                         *model_flags(server), store=store))
        kill_when(proc, server, 150)
    listing = subprocess.run(cli("runs", "--json", store=store), capture_output=True, text=True, check=True)
    rows = json.loads(listing.stdout)
    assert [(r["run_id"], r["status"]) for r in rows] == [("shown", "interrupted")]
    assert rows[0]["question"] == QUESTION
    assert rows[0]["source"].endswith("book.txt")
    shown = subprocess.run(cli("show", "shown", store=store), capture_output=True, text=True, check=True)
    assert "shown · interrupted" in shown.stdout
    assert "resume with: rlm-graph resume shown" in shown.stdout
    assert re.search(r"progress: \d+ of ~\d+ pieces read", shown.stdout)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path: Path, book: Path) -> None:
    store = str(tmp_path / "s.sqlite")
    with FakeOpenAIServer(item_reply(latency_s=0.02)) as server:
        proc = start(cli("run", str(book), "-q", QUESTION, *RUN_FLAGS, *model_flags(server), store=store))
        deadline = time.monotonic() + 60
        while len(server.requests) < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        run_id = re.search(r"run (run-[0-9a-f]{12})", err).group(1)  # type: ignore[union-attr]
        assert f"resume with: rlm-graph resume {run_id}" in err
        assert "Traceback" not in err
        sent = len(server.requests)
        final = finish(cli("resume", run_id, "--json", *resume_flags(server), store=store))
    assert final["status"] == "done"
    assert len(final["answer"]) == 320
    assert len(server.requests) - sent <= len(server.calls_per_prompt)
    assert sum(n - 1 for n in server.calls_per_prompt.values()) <= CONCURRENCY


def test_rm_deletes_the_run_and_its_source(finished_run: tuple[str, Any]) -> None:
    store, _ = finished_run
    removed = subprocess.run(cli("rm", "one", store=store), capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    assert "removed one" in removed.stderr
    listing = subprocess.run(cli("runs", "--json", store=store), capture_output=True, text=True, check=True)
    assert json.loads(listing.stdout) == []
    again = subprocess.run(cli("show", "one", store=store), capture_output=True, text=True)
    assert again.returncode == 2
    assert "No run 'one'" in again.stderr


# -- stores that must be refused ------------------------------------------------


async def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"my notes, not a database\n" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="is not an rlm-graph store"):
        async with open_store(path):
            pass
    assert path.read_bytes() == before


async def test_another_programs_database_is_refused_untouched(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="database of another program \\(tables: customers\\)"):
        async with open_store(path):
            pass
    assert path.read_bytes() == before


async def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    async with open_store(path) as store:
        await store.kv.aput(("rlm_graph", "meta"), "format", {"product": "rlm-graph", "format": 99})
    with pytest.raises(StoreError, match="written by a newer rlm-graph \\(store format 99"):
        async with open_store(path):
            pass


async def test_a_damaged_database_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    async with open_store(path):
        pass
    data = bytearray(path.read_bytes())
    data[100:4000] = os.urandom(3900)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="s.sqlite"):
        async with open_store(path) as store:
            await store.list_runs()


@pytest.mark.postgres
async def test_unreachable_postgres_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        async with open_store("postgresql://me:s3cret-pw@127.0.0.1:1/none"):
            pass
    message = str(caught.value)
    assert "Cannot reach the PostgreSQL store postgresql://me:***@127.0.0.1:1/none" in message
    assert "s3cret-pw" not in message


def test_cli_store_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not sqlite")
    done = subprocess.run(cli("runs", store=str(bad)), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


async def test_a_finished_run_is_checked_before_its_result_is_returned(tmp_path: Path, book: Path) -> None:
    store = str(tmp_path / "s.sqlite")
    with FakeOpenAIServer(item_reply()) as server:
        await api.arun(
            QUESTION, [book], store=store, run_id="fin", model="openai/fake-model",
            api_base=server.api_base, context_window=4096, kind="list", chunk_tokens=64,
        )
        sent = len(server.requests)
        with pytest.raises(ResumeMismatchError, match="asked"):
            await api.aresume("fin", store=store, question="Another question?")
        with pytest.raises(ResumeMismatchError, match="chunk_tokens"):
            await api.aresume("fin", store=store, chunk_tokens=99)
        # The model it really used is no difference, even if it was not named then.
        same = await api.aresume("fin", store=store, worker_model="openai/fake-model")
    assert same.status == "done"
    assert len(server.requests) == sent


async def test_usage_after_a_resume_counts_every_session(store_url: str, book: Path) -> None:
    failing = _always()
    with FakeOpenAIServer(item_reply(fail_marker="Paragraph 9.", failing=failing)) as server:
        first = await api.arun(
            QUESTION, [book], store=store_url, run_id="twice", model="openai/fake-model",
            api_base=server.api_base, context_window=4096, kind="list", chunk_tokens=64,
        )
        failing.clear()
        second = await api.aresume("twice", store=store_url, api_base=server.api_base)
        async with open_store(store_url) as opened:
            listed = {r.run_id: r for r in await opened.list_runs()}
    assert first.status == "partial" and second.status == "done"
    assert second.usage.calls == first.usage.calls + 1 == len(server.requests)
    assert listed["twice"].progress["calls"] == second.usage.calls
    assert listed["twice"].progress["leaves_estimate"] == first.usage.calls


def test_read_only_commands_do_not_create_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "typo.sqlite"
    listing = subprocess.run(cli("runs", store=str(missing)), capture_output=True, text=True)
    assert listing.returncode == 0
    assert "no store there yet" in listing.stderr
    shown = subprocess.run(cli("show", "x", store=str(missing)), capture_output=True, text=True)
    assert shown.returncode == 2
    assert "There is no rlm-graph store at" in shown.stderr
    assert not missing.exists()


async def test_runs_opening_a_new_store_at_once_all_succeed(store_url: str, tmp_path: Path) -> None:
    """Three runs that start together on a store nobody has made yet (an agent
    asking two questions in one turn) each finish; the store opens afterwards."""
    import asyncio

    texts = [numbered_paragraphs(6 + i, words=12) for i in range(3)]
    with FakeOpenAIServer(item_reply()) as server:
        settings = {
            "model": "openai/fake-model", "api_base": server.api_base, "context_window": 4096,
            "kind": "list", "chunk_tokens": 64, "overlap_tokens": 0, "planner": "rules",
        }
        results = await asyncio.gather(
            *(api.arun(QUESTION, text=text, store=store_url, **settings) for text in texts)
        )
    assert [r.status for r in results] == ["done"] * 3
    assert [len(r.answer) for r in results] == [6, 7, 8]
    async with open_store(store_url, create=False) as store:
        assert len(await store.list_runs()) == 3
