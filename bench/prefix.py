"""Prefix-caching benchmark: many requests sharing a long system prompt, caching off vs on, in one run.

    python -m bench.prefix            # 32 requests, 512-token system prompt, 32 output tokens each
    python -m bench.prefix --quick    # 8 requests, 16 output tokens
    python -m bench.prefix --restart  # a 2,000-token prefix: cold, cached in memory, after a restart

Every request is the same system prompt followed by a short distinct
question, all submitted at once (a burst), greedy with a fixed output length
so both runs do the same work. Reports time to first token (p50, p99), output
throughput, prompt tokens computed by prefill, and the peak of KV blocks in
use, for each setting; checks that the outputs are identical; writes
bench/results/prefix.json and prefix.png.

With --restart: the time to first token of one request whose 2,000-token prefix is new (cold), of one whose prefix
an earlier request cached in this engine's memory, and of one whose prefix an earlier engine on the same
`disk_cache_dir` cached (the engine restarted in between); five rounds, each on a fresh folder. Writes
bench/results/prefix_restart.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.__main__ import cpu_flags
from kvmux import Engine, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"

SYSTEM_TEXT = (
    "You are a careful assistant for a company that runs a large fleet of inference servers. "
    "Answer questions about memory, caching and scheduling precisely and briefly. When a question "
    "is ambiguous, state the assumption you make. Prefer numbers to adjectives, cite the component "
    "involved, and never invent configuration options that do not exist. "
)


def build_prompts(tokenizer, num_requests: int, system_tokens: int) -> list[list[int]]:
    ids: list[int] = []
    while len(ids) < system_tokens:
        ids += tokenizer.tokenize(SYSTEM_TEXT, add_special_tokens=False)
    system = ids[:system_tokens]
    return [system + tokenizer.tokenize(f"\nQuestion {i}: how many blocks does a {16 * (i + 1)}-token prompt "
                                      f"use when blocks hold {8 + i % 3 * 8} tokens?\nAnswer:",
                                      add_special_tokens=False)
            for i in range(num_requests)]


async def run(caching: bool, prompts: list[list[int]], max_tokens: int, options: dict) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    async with Engine(enable_prefix_caching=caching, **options) as engine:
        # Warm torch up on an unrelated prompt, so neither run pays first-call costs.
        await engine.complete("Warm-up: count to five.", SamplingParams(max_tokens=4, temperature=0))
        before = await engine.stats()
        peak = 0
        done = asyncio.Event()

        async def watch_pool():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, engine.blocks.num_used)
                await asyncio.sleep(0.002)

        async def one(prompt):
            start = time.perf_counter()
            first, tokens = None, []
            async for out in engine.generate(prompt, params):
                if first is None and out.token_ids:
                    first = time.perf_counter() - start
                tokens += out.token_ids
            return first, tokens

        watcher = asyncio.create_task(watch_pool())
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        done.set()
        await watcher
        after = await engine.stats()
        if engine.blocks.num_free != engine.blocks.num_blocks:
            raise RuntimeError("KV blocks leaked")

    ttft = [r[0] for r in results]
    output_tokens = sum(len(r[1]) for r in results)
    return {
        "prefix_caching": caching,
        "requests": len(prompts),
        "wall_s": wall,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / wall,
        "prefill_tokens_computed": after["prompt_tokens_computed"] - before["prompt_tokens_computed"],
        "prompt_tokens": sum(map(len, prompts)),
        "prefix_cache_hits": after["prefix_cache_hits"] - before["prefix_cache_hits"],
        "peak_blocks_used": peak,
        "block_size": after["block_size"],
        "outputs": [r[1] for r in results],
    }


async def first_token_s(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    async for out in engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)):
        if out.token_ids:
            return time.perf_counter() - start
    raise RuntimeError("no token")


async def restart_round(model, folder: str, prefix: list[int], questions: list[list[int]]) -> dict:
    async with Engine(model, disk_cache_dir=folder, disk_cache_gib=1.0) as engine:
        await engine.complete("Warm-up: count to five.", SamplingParams(max_tokens=4, temperature=0))
        cold = await first_token_s(engine, prefix + questions[0])
        memory = await first_token_s(engine, prefix + questions[1])
    started = time.perf_counter()
    async with Engine(model, disk_cache_dir=folder, disk_cache_gib=1.0) as engine:
        start_s = time.perf_counter() - started
        await engine.complete("Warm-up: count to five.", SamplingParams(max_tokens=4, temperature=0))
        restarted = await first_token_s(engine, prefix + questions[2])
        stats = await engine.stats()
    return {"cold_s": cold, "memory_hit_s": memory, "after_restart_s": restarted, "engine_start_s": start_s,
            "disk_blocks_restored": stats["disk_blocks_restored"], "prefix_cache_hits_disk": stats["prefix_cache_hits_disk"],
            # A model with sliding-window layers: the window's slots the hit took from their own disk store.
            **{key: stats[key] for key in ("sliding_disk_blocks_restored", "sliding_slots_from_disk") if key in stats}}


def restart_main(args) -> None:
    import tempfile

    async def rounds():
        async with Engine(args.model, num_blocks=16) as probe:
            prompts = build_prompts(probe.tokenizer, 3, args.system_tokens)
        prefix = prompts[0][:args.system_tokens]
        questions = [p[args.system_tokens:] for p in prompts]
        out = []
        for _ in range(5):
            with tempfile.TemporaryDirectory(prefix="kvmux-bench-") as folder:
                out.append(await restart_round(args.model, folder, prefix, questions))
        return out

    runs = asyncio.run(rounds())
    median = {k: float(np.median([r[k] for r in runs])) for k in ("cold_s", "memory_hit_s", "after_restart_s",
                                                                   "engine_start_s")}
    report = {
        "command": "python -m bench.prefix " + " ".join(sys.argv[1:]), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_flags": cpu_flags(),
        "load_average_at_end": os.getloadavg()[0], "prefix_tokens": args.system_tokens, "runs": runs,
        "median": median, "cold_over_restart": median["cold_s"] / median["after_restart_s"],
        "restart_over_memory": median["after_restart_s"] / median["memory_hit_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_restart.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    keys = [("cold_s", "cold"), ("memory_hit_s", "cached in memory"), ("after_restart_s", "after a restart")]
    ax.bar([label for _, label in keys], [median[k] * 1e3 for k, _ in keys], color=["#888", "#3a7", "#37a"])
    ax.set_ylabel("time to first token, ms (median of 5)")
    ax.set_title(f"{args.system_tokens}-token prefix: cold / restart = {report['cold_over_restart']:.1f}x, "
                 f"restart / memory = {report['restart_over_memory']:.2f}x", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "prefix_restart.png", dpi=110)
    print(f"TTFT cold {median['cold_s'] * 1e3:.1f} ms, in memory {median['memory_hit_s'] * 1e3:.1f} ms, after a "
          f"restart {median['after_restart_s'] * 1e3:.1f} ms (cold/restart {report['cold_over_restart']:.1f}x, "
          f"restart/memory {report['restart_over_memory']:.2f}x); engine start {median['engine_start_s']:.2f} s")
    print(f"wrote {args.out / 'prefix_restart.json'} and prefix_restart.png")


def plot(off: dict, on: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)"), ("output_tok_s", "output tokens/s"),
              ("prefill_tokens_computed", "prefill tokens computed"), ("peak_blocks_used", "peak KV blocks in use")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        values = [off[key], on[key]]
        bars = ax.bar(["off", "on"], values, color=["tab:gray", "tab:green"])
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        # Each panel states its gain from caching: throughput goes up, the rest go down.
        higher_is_better = key == "output_tok_s"
        num, den = (on[key], off[key]) if higher_is_better else (off[key], on[key])
        ratio = num / den if den else float("inf")
        ax.set_title(f"{title}\n{'on/off' if higher_is_better else 'off/on'} = {ratio:.1f}x", fontsize=9)
        ax.margins(y=0.2)
    fig.suptitle(f"prefix caching: {on['requests']} requests sharing a system prompt", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 requests, 16 output tokens")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--system-tokens", type=int, default=None, help="default: 512, 2000 with --restart")
    parser.add_argument("--restart", action="store_true", help="TTFT cold, cached in memory, after a restart")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.restart:
        args.system_tokens = args.system_tokens or 2000
        return restart_main(args)
    args.system_tokens = args.system_tokens or 512
    num_requests = args.requests or (8 if args.quick else 32)
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    options = {"model": args.model, "num_blocks": 4096}

    async def both():
        # Tokenize once with the engine's own tokenizer.
        async with Engine(args.model, num_blocks=16) as probe:
            prompts = build_prompts(probe.tokenizer, num_requests, args.system_tokens)
        off = await run(False, prompts, max_tokens, options)
        on = await run(True, prompts, max_tokens, options)
        return off, on

    off, on = asyncio.run(both())
    identical = off.pop("outputs") == on.pop("outputs")
    ratios = {
        "ttft_p50": off["ttft_p50_s"] / on["ttft_p50_s"],
        "prefill_tokens": off["prefill_tokens_computed"] / max(1, on["prefill_tokens_computed"]),
        "throughput": on["output_tok_s"] / off["output_tok_s"],
    }
    targets = {"ttft_p50": 5.0, "prefill_tokens": 5.0, "throughput": 2.0}
    report = {
        "workload": {"requests": num_requests, "system_tokens": args.system_tokens, "max_tokens": max_tokens,
                     "arrival": "all at once", "sampling": "greedy, ignore_eos"},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "off": off, "on": on, "outputs_identical": identical,
        "ratios": ratios, "targets": targets,
        "targets_met": {k: ratios[k] >= v for k, v in targets.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(off, on, args.out / "prefix.png")
    for name, r in (("off", off), ("on", on)):
        print(f"caching {name:3}: TTFT p50 {r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s  "
              f"{r['output_tok_s']:.1f} tok/s  prefill {r['prefill_tokens_computed']} tokens  "
              f"peak {r['peak_blocks_used']} blocks")
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()}, "targets met:", report["targets_met"],
          "outputs identical:", identical)
    print(f"wrote {args.out / 'prefix.json'} and {args.out / 'prefix.png'}")


if __name__ == "__main__":
    main()
