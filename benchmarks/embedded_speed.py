"""How fast the embedded model runs here: load, prompt processing, generation, memory.

Run: ``.venv/bin/python benchmarks/embedded_speed.py`` (``--help`` for sizes).

Part 1 measures the settings rlm_graph.local uses, once per thread count, each in a
fresh subprocess so its load time and memory are its own. Part 2 compares n_batch,
n_ubatch and flash attention on prompt speed: all settings are loaded in one process
and take turns on each prompt, best of two, so they share whatever else the machine
is doing. Speeds come from llama.cpp's own counters, with the KV cache cleared before
every prompt; the text is the bundled examples/alice_in_wonderland.txt, cut to the
token counts asked.

``loadavg`` (1-minute load average) and ``cpu%`` (CPU time over wall time, per
thread) show how busy the machine was; with other work running, figures are only
comparable within one run.

Measured 2026-12-04, 2 cores, llama-cpp-python 0.3.36 built with GGML_NATIVE=OFF,
SmolLM2-135M Q4_1, 8K window, while other test runs shared the machine (load 1-5):

- load 0.3-0.4 s (vocabulary only: 0.2 s); import llama_cpp 0.2 s. Memory: 244 MB
  before the model (Python, litellm, llama_cpp), 539 MB loaded, peak 746 MB on a
  6000-token prompt, 600 MB with flash attention.
- Part 2 (load 1.2-1.8), prompt tokens/s at 500 / 3000 tokens: 1 thread 61 / 62;
  n_batch 2048: 61 / 62; n_batch and n_ubatch 2048: 59 / 58; flash attention
  69 / 80, with 2048 batches 73 / 74; 2 threads 112 / 87, with flash and 2048
  batches 111 / 100.
- Part 1 with flash attention, tokens/s: 1 thread (load 2.7) prompts of 500 / 1500
  / 3000 / 6000 at 45 / 64 / 91 / 50, generation 46, 11 after 3000 tokens, 42 under
  a JSON grammar; 2 threads (load 2.1) 52 / 104 / 116 / 86, generation 67, 26, 72.
- Generation, 1 thread, flash off / on, taking turns: 47-51 / 50-63 tokens/s after
  30 tokens, 17-21 / 12 after 3000.
- Threads under load 3.5-4, taking turns: 1 thread 49-104 prompt and 16-47
  generated tokens/s; 2 threads 26-79 and 3-17. With a core taken by other work,
  llama.cpp's spinning thread barriers stall, hence one core left free by default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlm_graph import local

TEXT_FILE = Path(__file__).resolve().parents[1] / "examples" / "alice_in_wonderland.txt"
GENERATED_TOKENS = 64
SCHEMA = {
    "type": "object",
    "properties": {
        "relevant": {"type": "boolean"},
        "answer": {"type": "string"},
        "evidence": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["relevant", "answer", "evidence"],
}
SETTINGS = [  # threads, n_batch, n_ubatch, flash_attn
    (1, 512, 512, False),
    (1, 2048, 512, False),
    (1, 2048, 2048, False),
    (1, 512, 512, True),
    (1, 2048, 2048, True),
    (2, 512, 512, False),
    (2, 2048, 2048, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1500,3000,6000", help="prompt tokens")
    parser.add_argument("--threads", default="1,2", help="part 1 thread counts")
    parser.add_argument("--setting-sizes", default="500,3000", help="part 2 prompts")
    parser.add_argument("--skip-settings", action="store_true", help="part 1 only")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.one:
        print(json.dumps(measure_defaults(int(args.one), sizes)))
        return

    print(f"model {local.embedded_model_path().name}, {os.cpu_count()} cores")
    print(
        f"part 1: n_batch {local.N_BATCH_TOKENS}, n_ubatch {local.N_UBATCH_TOKENS}, "
        f"flash_attn {local.USE_FLASH_ATTN}; tokens/s"
    )
    for threads in [int(t) for t in args.threads.split(",")]:
        command = [
            sys.executable,
            __file__,
            "--one",
            str(threads),
            "--sizes",
            args.sizes,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.splitlines()[-1])
        print("  " + ", ".join(f"{key} {fmt(value)}" for key, value in row.items()))
    if not args.skip_settings:
        compare_settings([int(size) for size in args.setting_sizes.split(",")])


def measure_defaults(threads: int, sizes: list[int]) -> dict[str, Any]:
    """Load time, memory and speeds with the module's settings, in this process."""
    started = time.perf_counter()
    import llama_cpp

    row: dict[str, Any] = {"threads": threads}
    row["import_s"] = time.perf_counter() - started
    row["rss_before_MB"] = rss_mb()  # Python, litellm and llama_cpp, no model yet
    started = time.perf_counter()
    llama = load(
        llama_cpp,
        threads,
        local.N_BATCH_TOKENS,
        local.N_UBATCH_TOKENS,
        local.USE_FLASH_ATTN,
    )
    row["load_s"] = time.perf_counter() - started
    row["rss_loaded_MB"] = rss_mb()
    cpu_started, wall_started = cpu_s(), time.perf_counter()

    tokens = text_tokens(llama)
    for size in sizes:
        row[f"pp{size}"] = size / prompt_seconds(llama_cpp, llama, tokens[:size])
    row["gen"] = generation_rate(llama_cpp, llama, tokens[:30], None)
    row["gen_after_3000"] = generation_rate(llama_cpp, llama, tokens[:3000], None)
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    row["gen_json"] = generation_rate(llama_cpp, llama, tokens[:30], grammar)
    row["rss_peak_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall = time.perf_counter() - wall_started
    row["cpu%"] = 100 * (cpu_s() - cpu_started) / wall / threads
    row["loadavg"] = os.getloadavg()[0]
    return row


def compare_settings(sizes: list[int]) -> None:
    """Prompt tokens/s for each setting, taking turns on the same prompts."""
    import llama_cpp

    llamas = {setting: load(llama_cpp, *setting) for setting in SETTINGS}
    tokens = text_tokens(next(iter(llamas.values())))
    best: dict[tuple[Any, ...], dict[int, float]] = {s: {} for s in SETTINGS}
    for size in sizes:
        for _ in range(2):
            for setting, llama in llamas.items():
                rate = size / prompt_seconds(llama_cpp, llama, tokens[:size])
                best[setting][size] = max(best[setting].get(size, 0.0), rate)

    print(f"part 2: prompt tokens/s, best of 2 (loadavg now {os.getloadavg()[0]:.1f})")
    print("  thr  n_batch  n_ubatch  flash  " + "  ".join(f"{s:>6}" for s in sizes))
    for (threads, n_batch, n_ubatch, flash), rates in best.items():
        cells = "  ".join(f"{rates[size]:>6.0f}" for size in sizes)
        print(f"  {threads:>3}  {n_batch:>7}  {n_ubatch:>8}  {flash!s:>5}  {cells}")


def load(llama_cpp: Any, threads: int, n_batch: int, n_ubatch: int, flash: bool) -> Any:
    return llama_cpp.Llama(
        model_path=str(local.embedded_model_path()),
        n_ctx=local.DEFAULT_N_CTX_TOKENS,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        flash_attn=flash,
        n_threads=threads,
        n_threads_batch=threads,
        seed=local.DEFAULT_SEED,
        verbose=False,
    )


def text_tokens(llama: Any) -> list[int]:
    return list(llama.tokenize(TEXT_FILE.read_bytes() * 2, add_bos=False))


def prompt_seconds(llama_cpp: Any, llama: Any, tokens: list[int]) -> float:
    llama.reset()
    llama_cpp.llama_perf_context_reset(llama.ctx)
    llama.create_completion(prompt=tokens, max_tokens=1, temperature=0)
    return float(llama_cpp.llama_perf_context(llama.ctx).t_p_eval_ms) / 1000


def generation_rate(
    llama_cpp: Any, llama: Any, prompt: list[int], grammar: Any
) -> float:
    """Generated tokens per second; without a grammar, end-of-text is banned."""
    llama.reset()
    llama_cpp.llama_perf_context_reset(llama.ctx)
    llama.create_completion(
        prompt=prompt,
        max_tokens=GENERATED_TOKENS,
        temperature=0,
        grammar=grammar,
        logit_bias=None if grammar else {llama.token_eos(): float("-inf")},
    )
    perf = llama_cpp.llama_perf_context(llama.ctx)
    return float(perf.n_eval) / (perf.t_eval_ms / 1000)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fmt(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


if __name__ == "__main__":
    main()
