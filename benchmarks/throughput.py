"""Throughput of the model layer against a 200 ms HTTP double.

Sends N independent calls through :class:`rlm_graph.models.ModelClient` (the
Router, retries, limits, budget and call log, all of it) to FakeOpenAIServer
answering every request after a fixed latency. A perfect client keeps
``concurrency`` requests in flight all the time, so the ideal is
``concurrency / latency`` calls per second; the goal is >= 90 % of that.

The second part runs the whole engine (graph, split, verify, merge) over a
source of the same number of leaf calls, to show what the engine adds.

With ``--layers`` it first times the layers under the engine one by one, each
at the same concurrency against the same double: a bare HTTP client (httpx),
``litellm.acompletion``, a LiteLLM ``Router`` and rlm-graph's ``ModelClient``.
The drop from one layer to the next is what that layer costs. The first three
are kept at ``concurrency`` calls by the benchmark; the client is given every
call and keeps its own limit, taking its slots as each request leaves (so it
prepares the next requests while ``concurrency`` are at the server).

The double runs in a child process, as a real server would: in this process
its threads would take turns with the client for the interpreter lock. CPU
per call is this process's CPU time divided by the calls; when it times the
ideal rate exceeds the CPU this process can get, the ratio falls below 1
whatever the scheduling.

Run: python benchmarks/throughput.py [--calls 400] [--latency 0.2] [--concurrency 8 16 32]
Prints figures; it is not a test and asserts nothing. On a shared machine the
figures move with the others' load: say so when quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

from rlm_graph import RunConfig, arun
from rlm_graph.models import ModelClient
from rlm_graph.testing import FakeOpenAIServer, ModelRequest, Reply

PARAGRAPH = (
    "Paragraph {i}. The river ran slowly past the old mill while the town slept and "
    "the lamps burned low along the quiet street near the square, and nobody came."
)

# Every layer runs a priced model, as a hosted one is (LiteLLM's price map) and
# as a local one can be (--price-in 0): USD per million tokens, and per token.
PRICES = {"price_in": 0.15, "price_out": 0.6}
PRICES_PER_TOKEN = {"input_cost_per_token": 0.15e-6, "output_cost_per_token": 0.6e-6}


def serve(latency: float) -> None:
    """Child process: answer every request after ``latency`` s until stdin closes."""

    def respond(request: ModelRequest) -> Reply:
        return Reply(content='{"items": []}', latency_s=latency)

    with FakeOpenAIServer(respond) as server:
        print(server.api_base, flush=True)
        sys.stdin.read()


@contextmanager
def served(latency: float) -> Iterator[str]:
    """Start the double in a child process; yield its api_base."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(latency)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        yield child.stdout.readline().strip()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


async def client_throughput(
    api_base: str, calls: int, concurrency: int, *, priced: bool = True
) -> tuple[float, float]:
    """Calls per second through ModelClient.complete, and CPU ms per call.

    ``priced``: the model has a price (given as flags here, as a hosted model's
    comes from LiteLLM's price map). Without one, LiteLLM runs its zero-cost
    diagnostic on every reply, which is most of the difference.
    """
    prices = PRICES if priced else {}
    config = RunConfig(
        model="openai/fake-model",
        api_base=api_base,
        api_key="sk-bench",
        context_window=4096,
        concurrency=concurrency,
        **prices,
    )
    client = ModelClient(config)
    await asyncio.gather(
        *(
            client.complete(
                "worker", [{"role": "user", "content": f"warm-up {i}"}], max_tokens=8
            )
            for i in range(concurrency)
        )
    )
    started, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(
        *(
            client.complete(
                "worker", [{"role": "user", "content": f"question {i}"}], max_tokens=8
            )
            for i in range(calls)
        )
    )
    elapsed = time.monotonic() - started
    return calls / elapsed, (time.process_time() - cpu) / calls * 1000


async def layer_throughput(
    layer: str, api_base: str, calls: int, concurrency: int
) -> tuple[float, float]:
    """Calls per second and CPU ms per call of one layer, ``concurrency`` in flight."""
    import httpx
    import litellm

    def messages(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"question {i}"}]

    async with httpx.AsyncClient(timeout=30) as http:
        if layer == "httpx":

            async def call(i: int) -> object:
                body = {"model": "fake-model", "messages": messages(i), "max_tokens": 8}
                return await http.post(f"{api_base}/chat/completions", json=body)

        elif layer == "litellm":

            async def call(i: int) -> object:
                return await litellm.acompletion(
                    model="openai/fake-model", api_base=api_base, api_key="sk-bench",
                    messages=messages(i), max_tokens=8, **PRICES_PER_TOKEN,
                )

        elif layer == "router":
            router = litellm.Router(model_list=[{
                "model_name": "worker",
                "litellm_params": {
                    "model": "openai/fake-model", "api_base": api_base, "api_key": "sk-bench",
                },
                "model_info": {
                    **PRICES_PER_TOKEN,
                    "cache_read_input_token_cost": PRICES_PER_TOKEN["input_cost_per_token"],
                    "cache_creation_input_token_cost": PRICES_PER_TOKEN["input_cost_per_token"],
                },
            }])

            async def call(i: int) -> object:
                return await router.acompletion(model="worker", messages=messages(i), max_tokens=8)

        else:
            client = ModelClient(RunConfig(
                model="openai/fake-model", api_base=api_base, api_key="sk-bench",
                context_window=4096, concurrency=concurrency, **PRICES,
            ))

            async def call(i: int) -> object:
                return await client.complete("worker", messages(i), max_tokens=8)

        # The client keeps its own limit, and prepares the next calls while
        # `concurrency` requests are at the server: it is given every call at once.
        slots = asyncio.Semaphore(calls if layer == "client" else concurrency)

        async def one(i: int) -> None:
            async with slots:
                await call(i)

        await asyncio.gather(*(one(-1 - i) for i in range(concurrency)))
        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(one(i) for i in range(calls)))
        elapsed = time.monotonic() - started
    return calls / elapsed, (time.process_time() - cpu) / calls * 1000


async def engine_throughput(
    api_base: str, leaves: int, concurrency: int
) -> tuple[float, int, float]:
    """Calls per second of a whole run with about ``leaves`` leaf calls."""
    text = "\n\n".join(PARAGRAPH.format(i=i) for i in range(leaves)) + "\n"
    started, cpu = time.monotonic(), time.process_time()
    result = await arun(
        "List every visitor named in the text.",
        text=text,
        model="openai/fake-model",
        api_base=api_base,
        api_key="sk-bench",
        context_window=4096,
        chunk_tokens=40,
        overlap_tokens=0,
        concurrency=concurrency,
        fan_out=16,
        **PRICES,
        store="memory",  # a fresh call log per run, and nothing in the user's store
    )
    elapsed = time.monotonic() - started
    calls = result.usage.calls
    return calls / elapsed, calls, (time.process_time() - cpu) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--layers", action="store_true",
        help="first time httpx, litellm.acompletion, a Router and ModelClient alone",
    )
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return

    print(
        f"{args.calls} calls, {args.latency * 1000:.0f} ms per call (FakeOpenAIServer, child process)"
    )
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("layer    concurrency  ideal/s  measured/s  ratio  CPU ms/call")
    with served(args.latency) as api_base:
        if args.layers:
            for concurrency in args.concurrency:
                ideal = concurrency / args.latency
                for layer in ("httpx", "litellm", "router", "client"):
                    rate, cpu_ms = asyncio.run(
                        layer_throughput(layer, api_base, args.calls, concurrency)
                    )
                    print(
                        f"{layer:<8} {concurrency:>11}  {ideal:>7.1f}  {rate:>10.1f}  {rate / ideal:>5.0%}  {cpu_ms:>11.1f}"
                    )
            print("(layers: each row alone; 'client' is ModelClient, as below)")
        for priced in (True, False):
            for concurrency in args.concurrency:
                ideal = concurrency / args.latency
                rate, cpu_ms = asyncio.run(
                    client_throughput(api_base, args.calls, concurrency, priced=priced)
                )
                print(
                    f"client   {concurrency:>11}  {ideal:>7.1f}  {rate:>10.1f}  {rate / ideal:>5.0%}  {cpu_ms:>11.1f}"
                    + ("" if priced else "  (model without a price)")
                )
        for concurrency in args.concurrency:
            ideal = concurrency / args.latency
            rate, calls, cpu_ms = asyncio.run(
                engine_throughput(api_base, args.calls, concurrency)
            )
            print(
                f"engine   {concurrency:>11}  {ideal:>7.1f}  {rate:>10.1f}  {rate / ideal:>5.0%}  {cpu_ms:>11.1f}  ({calls} calls)"
            )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
