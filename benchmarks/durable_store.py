"""Durable-store figures: store size for a big source, bytes per superstep, store
growth per 1,000 calls, and resume overhead.

Run: ``.venv/bin/python benchmarks/durable_store.py [--mb 20] [--calls 1000]``

Model doubles answer every call (an in-process LiteLLM provider for the size
figures, the loopback HTTP double for the resume figures), so what is measured
is rlm-graph's own storage and restart cost, not a model's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

from rlm_graph import api  # noqa: E402
from rlm_graph.testing import FakeOpenAIServer, ModelRequest, Reply, ScriptedModel  # noqa: E402

WORDS = "the river ran slowly past an old mill while the town slept and lamps burned low".split()
EXCERPT = re.compile(r"<<<\n(.*)\n>>>", re.DOTALL)


def make_text(size: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    paragraphs, total = [], 0
    while total < size:
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 160)))
        paragraph = f"Note {len(paragraphs)}. {body}."
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def lister(request: ModelRequest) -> Reply:
    """Reader double: lists the 'Note N' of its excerpt."""
    match = EXCERPT.search(request.prompt)
    excerpt = match.group(1) if match else ""
    items = [{"item": m.group(1), "quote": m.group(0)} for m in re.finditer(r"(Note \d+)\. \w+", excerpt)]
    return Reply(content=json.dumps({"items": items[:40]}))


def table_bytes(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes = {}
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            try:
                sizes[name] = conn.execute("SELECT SUM(pgsize) FROM dbstat WHERE name=?", (name,)).fetchone()[0] or 0
            except sqlite3.OperationalError:
                sizes[name] = -1
        kinds = dict(conn.execute(
            "SELECT CASE WHEN prefix LIKE 'rlm_graph.calls%' THEN 'call log' "
            "WHEN prefix LIKE 'rlm_graph.sources%' THEN 'source' "
            "WHEN prefix LIKE 'rlm_graph.runs%' THEN 'registry' ELSE prefix END, "
            "SUM(LENGTH(value)) FROM store GROUP BY 1"
        ))
        steps = conn.execute(
            "SELECT c.checkpoint_id, LENGTH(c.checkpoint) + LENGTH(c.metadata), "
            "(SELECT COALESCE(SUM(LENGTH(w.value)), 0) FROM writes w WHERE w.checkpoint_id = c.checkpoint_id), "
            "(SELECT COUNT(*) FROM writes w WHERE w.checkpoint_id = c.checkpoint_id) "
            "FROM checkpoints c ORDER BY c.checkpoint_id"
        ).fetchall()
    return {"tables": sizes, "kv": kinds, "steps": steps}


def size_figures(megabytes: float, chunk_tokens: int) -> None:
    text = make_text(int(megabytes * 1_000_000))
    folder = Path(tempfile.mkdtemp(prefix="rlm-bench-"))
    store = folder / "store.sqlite"
    double = ScriptedModel(lister).register()
    started = time.perf_counter()
    result = api.run(
        "Which notes are there?", text=text, store=str(store), model="scripted/m",
        context_window=16384, kind="list", chunk_tokens=chunk_tokens,
    )
    elapsed = time.perf_counter() - started
    double.unregister()
    answers = len(json.dumps(result.model_dump(mode="json")["answer"]).encode())
    source_bytes = len(text.encode())
    file_bytes = store.stat().st_size
    figures = table_bytes(store)
    print(f"\n== store size: {megabytes:g} MB source, {result.usage.calls} calls, {elapsed:.0f} s ==")
    print(f"source {source_bytes / 1e6:.1f} MB, answers {answers / 1e3:.0f} KB")
    print(f"store file {file_bytes / 1e6:.1f} MB = {file_bytes / source_bytes:.2f} x source "
          f"(bound: < 2 x source + answers = {(2 * source_bytes + answers) / 1e6:.1f} MB)")
    for name, size in sorted(figures["tables"].items(), key=lambda kv: -kv[1]):
        if size > 0:
            print(f"  table {name:<24} {size / 1e6:8.2f} MB")
    for name, size in figures["kv"].items():
        print(f"  key-value {name:<20} {size / 1e6:8.2f} MB")
    print("bytes written per superstep (checkpoint blob + pending writes):")
    for number, (_, blob, writes, count) in enumerate(figures["steps"]):
        print(f"  step {number}: checkpoint {blob:>9,} B, {count:>5} writes {writes:>11,} B")


def resume_figures(calls_before_kill: int) -> None:
    text = make_text(calls_before_kill * 2 * 700)
    folder = Path(tempfile.mkdtemp(prefix="rlm-bench-"))
    store = folder / "store.sqlite"
    with FakeOpenAIServer(lister) as server:
        flags = [
            "--model", "openai/fake-model", "--api-base", server.api_base, "--context-window", "8192",
            "--kind", "list", "--chunk-tokens", "150", "--concurrency", "8", "--store", str(store),
        ]
        command = [sys.executable, "-m", "rlm_graph"]
        proc = subprocess.Popen([*command, "run", "-", "-q", "Which notes?", "--run-id", "bench", *flags],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdin is not None
        proc.stdin.write(text)
        proc.stdin.close()
        while len(server.requests) < calls_before_kill:
            time.sleep(0.002)
            if proc.poll() is not None:
                raise SystemExit("the run ended before the kill point; raise the text size")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with sqlite3.connect(store) as conn:  # fold the write-ahead log in first
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            source_bytes = conn.execute(
                "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM store WHERE prefix LIKE 'rlm_graph.sources%'"
            ).fetchone()[0]
        size_at_kill = store.stat().st_size - source_bytes
        sent = len(server.requests)
        started = time.perf_counter()
        resume = subprocess.Popen([*command, "resume", "bench", "--api-base", server.api_base,
                                   "--store", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while len(server.requests) == sent and resume.poll() is None:
            time.sleep(0.001)
        first_new = time.perf_counter() - started
        while len(server.requests) < sent + 50 and resume.poll() is None:
            time.sleep(0.002)
        resume.send_signal(signal.SIGKILL)
        resume.wait()
        in_process = asyncio.run(_in_process_resume(server, store))
    print(f"\n== resume after a kill at {calls_before_kill:,} calls ==")
    print(f"store at the kill, without the stored source: {size_at_kill / 1e6:.2f} MB = "
          f"{size_at_kill / calls_before_kill * 1000 / 1e6:.2f} MB per 1,000 calls")
    print(f"'rlm-graph resume' to its first new call: {first_new:.2f} s "
          "(includes starting Python and importing LiteLLM)")
    print(f"aresume() to its first new call, in a running process (after a second kill): {in_process:.2f} s")


async def _in_process_resume(server: FakeOpenAIServer, store: Path) -> float:
    sent = len(server.requests)
    started = time.perf_counter()
    task = asyncio.create_task(api.aresume("bench", store=str(store), api_base=server.api_base))
    while len(server.requests) == sent and not task.done():
        await asyncio.sleep(0.001)
    first = time.perf_counter() - started
    result = await task
    assert result.status == "done", result.status
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="source size for the store-size figures (0: skip)")
    parser.add_argument("--chunk-tokens", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=1000, help="calls made before the kill")
    args = parser.parse_args()
    print(f"machine load average at start: {os.getloadavg()[0]:.1f}")
    resume_figures(args.calls)
    if args.mb > 0:
        size_figures(args.mb, args.chunk_tokens)


if __name__ == "__main__":
    main()
