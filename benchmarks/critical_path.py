"""Do branches run independently? Critical-path efficiency on an uneven tree.

Builds a source of files of very different sizes, so the recursion tree is
uneven (a few deep subtrees, many shallow ones), and answers a question over it
with the scripted model double at a fixed latency per call. The ideal wall time
is what a perfect scheduler would take with the same number of model slots:
every task starts the moment its parent has split, every merge call is ready the
moment its children are done, and calls take free slots first come, first
served (a list-scheduling simulation over the tree the run really built).
Efficiency = ideal / measured wall time of the run (planning excluded); the
goal is >= 0.9. With unlimited slots the ideal is the longest chain of call
latencies, and the measured time then also shows the engine's per-call CPU cost
on this machine (LiteLLM's Router spends ~10-20 ms of CPU per call here).

Run: python benchmarks/critical_path.py [--latency 1.0] [--kind list]
Prints figures; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path

import heapq

from rlm_graph.api import execute, prepare
from rlm_graph.store import open_store
from rlm_graph.result import TaskNode
from rlm_graph.testing import ModelRequest, Reply, ScriptedModel

EXCERPT = re.compile(r"<<<\n(.*)\n>>>", re.DOTALL)
SENTENCE = "The keeper logged the weather and trimmed the lamp before the night watch began. "


def make_corpus(folder: Path) -> None:
    """Files from 1 to ~60 leaves each: an uneven tree."""
    sizes = [1, 1, 2, 3, 5, 8, 20, 2, 1, 30, 4, 1]
    for index, paragraphs in enumerate(sizes):
        body = "\n\n".join(
            f"Entry {index}-{p}. " + SENTENCE * 12 + (f"Marker M{index}x{p} was seen." if p % 7 == 0 else "")
            for p in range(paragraphs * 3)
        )
        (folder / f"log_{index:02d}.txt").write_text(body + "\n")


def responder(latency_s: float):
    def respond(request: ModelRequest) -> Reply:
        if "partial answers" in request.prompt:
            return Reply(content=json.dumps({"answer": "merged"}), latency_s=latency_s)
        excerpt = (EXCERPT.search(request.prompt) or [None, ""])[1]
        found = re.findall(r"Marker (M\d+x\d+) was seen\.", excerpt)
        if 'not stated' in request.prompt:
            quote = f"Marker {found[0]} was seen." if found else ""
            reply = {"relevant": bool(found), "quote": quote, "answer": ", ".join(found)}
            return Reply(content=json.dumps(reply), latency_s=latency_s)
        items = [{"item": m, "quote": f"Marker {m} was seen."} for m in found]
        return Reply(content=json.dumps({"items": items}), latency_s=latency_s)

    return respond


def ideal_time(node: TaskNode, latency_s: float, kind: str) -> float:
    """Longest chain of call latencies from this task down to its leaves."""
    if not node.children:
        return node.attempts * latency_s
    below = max(ideal_time(child, latency_s, kind) for child in node.children)
    merge = latency_s if kind == "text" and sum(c.answer is not None for c in node.children) > 1 else 0.0
    return below + merge


async def measure(folder: Path, latency_s: float, kind: str, concurrency: int) -> None:
    double = ScriptedModel(responder(latency_s)).register()
    try:
        engine = prepare(
            "List every marker that was seen.", [folder],
            model="scripted/bench", context_window=8192, chunk_tokens=600,
            overlap_tokens=0, fan_out=4, max_depth=6, concurrency=concurrency, kind=kind,
        )
        started = time.monotonic()
        async with open_store("memory") as store:  # a fresh call log for each measurement
            result = await execute(engine, store=store)
        wall = time.monotonic() - started
    finally:
        double.unregister()

    assert result.tree is not None
    leaves = sum(1 for _ in _leaves(result.tree))
    ideal = scheduled_time(result.tree, latency_s, kind, concurrency)
    print(
        f"kind={kind:5s} latency={latency_s:.2f}s slots={concurrency:6d} "
        f"leaves={leaves:4d} depth={_depth(result.tree)} calls={result.usage.calls:4d} "
        f"ideal={ideal:6.2f}s wall={wall:6.2f}s efficiency={ideal / wall:5.2f}"
    )


def scheduled_time(root: TaskNode, latency_s: float, kind: str, slots: int) -> float:
    """List-scheduling ideal: FIFO by ready time over ``slots`` model slots."""
    if slots >= 10_000:
        return ideal_time(root, latency_s, kind)
    parents: dict[str, TaskNode] = {}
    pending: dict[str, int] = {}
    ready: list[tuple[float, int, TaskNode, str]] = []
    order = 0

    def push(at: float, node: TaskNode, what: str) -> None:
        nonlocal order
        heapq.heappush(ready, (at, order, node, what))
        order += 1

    def visit(node: TaskNode) -> None:
        for child in node.children:
            parents[child.id] = node
            visit(child)
        pending[node.id] = len(node.children)
        if not node.children:
            for _ in range(max(node.attempts, 1)):
                push(0.0, node, "leaf")

    visit(root)
    free = [0.0] * slots
    finished: dict[str, float] = {}
    remaining_calls: dict[str, int] = {}
    while ready:
        at, _, node, what = heapq.heappop(ready)
        slot_free = heapq.heappop(free)
        done = max(at, slot_free) + latency_s
        heapq.heappush(free, done)
        remaining_calls[node.id] = remaining_calls.get(node.id, max(node.attempts, 1) if what == "leaf" else 1) - 1
        if remaining_calls[node.id] == 0:
            _finish(node, done, parents, pending, finished, push, kind)
    return finished[root.id]


def _finish(node, at, parents, pending, finished, push, kind) -> None:
    finished[node.id] = at
    parent = parents.get(node.id)
    if parent is None:
        return
    pending[parent.id] -= 1
    if pending[parent.id]:
        return
    ready_at = max(finished[c.id] for c in parent.children)
    needs_call = kind == "text" and sum(c.answer is not None for c in parent.children) > 1
    if needs_call:
        push(ready_at, parent, "merge")
    else:
        _finish(parent, ready_at, parents, pending, finished, push, kind)


def _leaves(node: TaskNode):
    if not node.children:
        yield node
    for child in node.children:
        yield from _leaves(child)


def _depth(node: TaskNode) -> int:
    return 1 + max((_depth(c) for c in node.children), default=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, nargs="*", default=[0.5, 2.0])
    parser.add_argument("--kind", choices=["list", "text"], nargs="*", default=["list", "text"])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[8, 32, 100_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_corpus(folder)
        for kind in args.kind:
            for latency in args.latency:
                for concurrency in args.concurrency:
                    asyncio.run(measure(folder, latency, kind, concurrency))


if __name__ == "__main__":
    main()
