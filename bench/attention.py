"""CPU paged attention: native kernels vs the torch reference, per layer and in whole engine runs.

    python -m bench.attention            # kernels on SmolLM2-135M shapes
    python -m bench.attention --engine   # also 64 requests x 64 output tokens per backend and dtype

Decode is timed at batch 1, 16 and 64 over contexts of 128, 1024 and 4096
tokens, prefill for a 512-token chunk with and without a cached prefix.
Writes bench/results/<--name>.json and .png (default attention). Kernel timings are the
median of repeated calls on one step's batch (the per-step plan is built once,
as in the engine, and reused by every layer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from kvmux.checks.reference import LAYER, make_case
from kvmux.ops.attention import torch_paged_attention
from kvmux.ops.cpu_attention import cpu_paged_attention
from kvmux.ops.threads import set_threads

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = dict(num_heads=9, num_kv_heads=3, head_dim=64, block_size=16)  # and 30 layers
# (name, batch, context, query tokens per sequence)
SHAPES = [(f"decode b{b} ctx{ctx}", b, ctx, 1) for b in (1, 16, 64) for ctx in (128, 1024, 4096)] + [
    ("prefill chunk 512", 1, 512, 512), ("prefill 512 after 512 cached", 1, 1024, 512)]


def time_ms(fn, min_time: float = 0.5, min_runs: int = 5) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def kernel_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    for name, batch, ctx, qlen in SHAPES:
        case = make_case([qlen] * batch, [ctx] * batch, SMOLLM2["num_heads"], SMOLLM2["num_kv_heads"],
                         SMOLLM2["head_dim"], SMOLLM2["block_size"], dtype, dtype, seed=0)
        cache = case.fresh_cache()
        b_native, b_torch = case.batch(), case.batch()
        native = time_ms(lambda: cpu_paged_attention(case.q, case.k, case.v, cache, LAYER, b_native, case.scale))
        ref = time_ms(lambda: torch_paged_attention(case.q, case.k, case.v, cache, LAYER, b_torch, case.scale))
        rows.append(dict(shape=name, dtype=str(dtype)[6:], native_ms=native, torch_ms=ref, speedup=ref / native))
        print(f"{name:30s} {str(dtype)[6:]:9s} native {native:8.2f} ms   torch {ref:8.2f} ms   x{ref / native:.1f}",
              flush=True)
    return rows


def engine_run(backend: str, dtype: str, requests: int, prompt_len: int, output_len: int) -> dict:
    from kvmux.engine.supervisor import Engine
    from kvmux.sampling import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def main():
        async with Engine(None, dtype=dtype, attention_backend=backend, max_num_seqs=requests) as engine:
            start = time.perf_counter()
            done = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
            return time.perf_counter() - start, done

    elapsed, done = asyncio.run(main())
    tokens = sum(len(c.token_ids) for c in done)
    row = dict(backend=backend, dtype=dtype, requests=requests, prompt_len=prompt_len, output_len=output_len,
               seconds=elapsed, output_tokens=tokens, output_tok_per_s=tokens / elapsed)
    print(f"engine {backend:6s} {dtype:8s} {tokens} output tokens in {elapsed:.1f} s: "
          f"{tokens / elapsed:.1f} tok/s", flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = bool(result["kernels"]) + bool(result["engine"])
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    rows = result["kernels"]
    if rows:
        plot_kernels(axes.pop(0), result)
    if result["engine"]:
        plot_engine(axes.pop(0), result["engine"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_kernels(ax, result: dict) -> None:
    rows = result["kernels"]
    labels = [f"{r['shape']}\n{r['dtype']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["torch_ms"] for r in rows], 0.4, label="torch reference")
    ax.bar([i + 0.2 for i in x], [r["native_ms"] for r in rows], 0.4, label="native C++")
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms per layer (SmolLM2-135M shapes)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"paged attention per layer, {result['threads']} threads")


def plot_engine(ax, runs: list[dict]) -> None:
    ax.bar([f"{r['backend']}\n{r['dtype']}\n#{i}" for i, r in enumerate(runs)], [r["output_tok_per_s"] for r in runs])
    ax.set_ylabel("output tokens/s")
    r0 = runs[0]
    ax.set_title(f"engine: {r0['requests']} requests x {r0['output_len']} tokens (prompt {r0['prompt_len']})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", action="store_true", help="also time whole engine runs per backend and dtype")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtypes", default="float32,bfloat16", help="engine dtypes, comma-separated")
    p.add_argument("--repeats", type=int, default=1, help="engine runs per backend and dtype")
    p.add_argument("--skip-kernels", action="store_true", help="engine runs only")
    p.add_argument("--threads", type=int, default=None, help="threads of torch and of kvmux's kernels [default: all cores]")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="attention", help="stem of the result files")
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # torch's side of the comparisons
    set_threads(threads)  # kvmux's kernels

    kernels = [] if args.skip_kernels else kernel_rows(torch.float32) + kernel_rows(torch.bfloat16)
    engine = []
    if args.engine:
        # Backends alternate, so load from other processes on a shared machine hits both alike.
        for dtype in args.dtypes.split(","):
            for _ in range(args.repeats):
                for backend in ("torch", "native"):
                    engine.append(engine_run(backend, dtype, args.requests, args.prompt_len, args.output_len))
    result = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=threads,
                  torch=torch.__version__, loadavg_at_end=os.getloadavg(), kernels=kernels, engine=engine)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
