"""Prefix-caching benchmark: many requests sharing a long system prompt, caching off vs on, in one run.

    python -m bench.prefix            # 32 requests, 512-token system prompt, 32 output tokens each
    python -m bench.prefix --quick    # 8 requests, 16 output tokens

Every request is the same system prompt followed by a short distinct
question, all submitted at once (a burst), greedy with a fixed output length
so both runs do the same work. Reports time to first token (p50, p99), output
throughput, prompt tokens computed by prefill, and the peak of KV blocks in
use, for each setting; checks that the outputs are identical; writes
bench/results/prefix.json and prefix.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np

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
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
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
