"""What `rlm-graph serve` adds per request, and what its HTTP library costs to import.

Prints: import time of aiohttp.web and of starlette + uvicorn (the alternative
considered), latency of GET /v1/models (HTTP layer only) and of a chat
completion whose run is one leaf call to the in-process ScriptedModel double
(HTTP + run setup + one call), sequentially and with 8 clients at once.

Run: .venv/bin/python benchmarks/serve_overhead.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from rlm_graph import RunConfig
from rlm_graph.serve import ServeSettings, serve_in_thread
from rlm_graph.testing import ScriptedModel

ROUNDS = 200
CHATS = 40


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [
        float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(3)
    ]
    return min(runs)


def main() -> None:
    print(f"import aiohttp.web: {import_time('aiohttp.web') * 1000:.0f} ms (min of 3)")
    print(
        f"import starlette.applications, uvicorn: "
        f"{import_time('starlette.applications, uvicorn') * 1000:.0f} ms (min of 3)"
    )

    reply = json.dumps({"relevant": True, "quote": "The lamp is lit.", "answer": "lit"})
    config = RunConfig(model="scripted/m", context_window=4096)
    body = {
        "model": "rlm/scripted/m",
        "messages": [
            {"role": "system", "content": "The lamp is lit."},
            {"role": "user", "content": "Is the lamp lit?"},
        ],
    }
    with (
        ScriptedModel(lambda request: reply),
        serve_in_thread(config, ServeSettings(port=0)) as url,
    ):
        with httpx.Client() as client:
            client.get(f"{url}/models")
            models = []
            for _ in range(ROUNDS):
                t = time.perf_counter()
                client.get(f"{url}/models").raise_for_status()
                models.append(time.perf_counter() - t)
            chats = []
            for _ in range(CHATS):
                t = time.perf_counter()
                client.post(
                    f"{url}/chat/completions", json=body, timeout=60
                ).raise_for_status()
                chats.append(time.perf_counter() - t)

        def one(_: int) -> float:
            t = time.perf_counter()
            httpx.post(
                f"{url}/chat/completions", json=body, timeout=60
            ).raise_for_status()
            return time.perf_counter() - t

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(one, range(CHATS)))
        wall = time.perf_counter() - started

    print(
        f"GET /v1/models: median {statistics.median(models) * 1000:.2f} ms over {ROUNDS}"
    )
    print(
        f"chat completion, one leaf call: median {statistics.median(chats) * 1000:.1f} ms over {CHATS}"
    )
    print(
        f"8 clients, {CHATS} chats: {CHATS / wall:.1f} requests/s, "
        f"median {statistics.median(parallel) * 1000:.0f} ms (max_runs=2)"
    )


if __name__ == "__main__":
    main()
