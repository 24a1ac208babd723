"""Sliding-window layers in a pool of their own (issue 26): KV bytes held and sequences at once, in one run.

    python -m bench.sliding_window --model gemma-3-270m-q4_k_m.gguf   # 16 prompts of 8,000 tokens

The same 16 distinct prompts (random token ids, --prompt-tokens each; distinct, so no prefix is shared), submitted
at once, --max-tokens greedy tokens each, twice on the same --kv-cache-gib: with the sliding-window pool (the
default) and with one pool where every layer keeps every token (`sliding_window_pool="off"`). Stats are sampled
every 0.2 s: the most sequences holding KV at once (running or prefilling), and the KV bytes each layer group holds
at the peak of blocks in use. What a
full-length pool would hold for the same tokens is the full-attention layers' bytes times layers / full-attention
layers. The two runs' outputs are compared token for token; as their schedules differ (16 sequences at once
against 4), bf16 rounding may flip a greedy token of these random prompts, so a third pair of runs compares them
on one schedule: 8 prompts of 2,000 tokens, all at once in both pools, where every output must be identical.
Writes bench/results/sliding_window.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from bench.__main__ import cpu_flags
from kvmux import Engine, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


async def run(model: str, prompts: list[list[int]], max_tokens: int, options: dict) -> dict:
    async with Engine(model, **options) as engine:
        pool = engine.pool
        samples: list[dict] = []

        async def sample() -> None:
            while True:
                samples.append(await engine.stats())
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        done = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
        elapsed = time.perf_counter() - started
        sampler.cancel()
    layers = pool.geometry.num_layers + (pool.sliding_geometry.num_layers if pool.sliding_geometry else 0)
    peak = max(samples, key=lambda s: s["blocks_used"])
    if pool.sliding_geometry is None:
        held = {"all_layers": peak["kv_bytes_all_layers"]}
        full_length = peak["kv_bytes_all_layers"]
    else:
        held = {"full_attention": peak["kv_bytes_full_attention"],
                "sliding_attention": peak["kv_bytes_sliding_attention"]}
        full_length = peak["kv_bytes_full_attention"] * layers // pool.geometry.num_layers
    return {
        "sliding_window_pool": pool.sliding_geometry is not None,
        "num_blocks": pool.num_blocks, "num_sliding_blocks": pool.num_sliding_blocks, "window": pool.window,
        "max_running": max(s["running"] + s["prefilling"] for s in samples),  # sequences holding KV
        "peak_blocks_used": peak["blocks_used"],
        "peak_kv_bytes": held, "peak_kv_bytes_total": sum(held.values()),
        "full_length_kv_bytes_for_the_same_tokens": full_length,
        "held_fraction_of_full_length": sum(held.values()) / full_length,
        "preemptions": peak.get("preemptions_recompute", 0) + peak.get("preemptions_swap", 0),
        "seconds": elapsed,
        "prompt_tok_s": sum(map(len, prompts)) / elapsed,
        "outputs": [d.token_ids for d in done],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [result["one_pool"], result["sliding_pool"]]
    names = ["one pool\n(every layer, every token)", "sliding-window pool"]
    fig, (ax, am) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax.bar(names, [r["max_running"] for r in runs], color=["#999", "#2a7"])
    ax.set_ylabel("sequences holding KV at once (peak)")
    ax.set_title(f"{result['num_prompts']} prompts of {result['prompt_tokens']} tokens, "
                 f"{result['kv_cache_gib']} GiB KV")
    mib = 2**20
    bottom = [0.0, 0.0]
    for group, color in (("all_layers", "#999"), ("full_attention", "#2a7"), ("sliding_attention", "#8c6")):
        values = [r["peak_kv_bytes"].get(group, 0) / mib for r in runs]
        am.bar(names, values, bottom=bottom, color=color, label=group.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    s = result["sliding_pool"]
    am.bar(["full-length pool\n(same tokens)"], [s["full_length_kv_bytes_for_the_same_tokens"] / mib], color="#ccc")
    am.text(1, bottom[1], f"{s['held_fraction_of_full_length']:.0%} of full length", ha="center", va="bottom")
    am.set_ylabel("KV MiB held at the peak")
    am.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model with sliding-window layers (Gemma 3)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=256, help="long enough that sequences overlap")
    parser.add_argument("--kv-cache-gib", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 200000) for _ in range(args.prompt_tokens)] for _ in range(args.num_prompts)]
    options = dict(kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.num_prompts, threads=args.threads,
                   dtype=args.dtype, max_model_len=args.prompt_tokens + args.max_tokens)
    load = os.getloadavg()[0]
    sliding = asyncio.run(run(args.model, prompts, args.max_tokens, options))
    one = asyncio.run(run(args.model, prompts, args.max_tokens, {**options, "sliding_window_pool": "off"}))
    same = sum(a == b for a, b in zip(sliding["outputs"], one["outputs"]))
    short = [[rng.randrange(1000, 200000) for _ in range(2000)] for _ in range(8)]
    parity = {**options, "kv_cache_gib": 2.0, "max_num_seqs": 8, "max_model_len": 2064}
    pair = [asyncio.run(run(args.model, short, 64, {**parity, "sliding_window_pool": pool}))["outputs"]
            for pool in ("on", "off")]
    same_schedule = sum(a == b for a, b in zip(*pair))
    result = {
        "model": Path(args.model).name, "num_prompts": args.num_prompts, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "kv_cache_gib": args.kv_cache_gib, "threads": args.threads,
        "cpu_flags": cpu_flags(), "load_average_at_start": load,
        "outputs_identical": f"{same}/{args.num_prompts}",
        "same_schedule_outputs_identical": f"{same_schedule}/{len(short)}",
        "sequences_at_once_ratio": sliding["max_running"] / one["max_running"],
        "sliding_pool": sliding, "one_pool": one,
    }
    for r in (sliding, one):
        print(f"sliding_window_pool={r['sliding_window_pool']}: {r['max_running']} at once, peak KV "
              f"{r['peak_kv_bytes_total'] / 2**20:.0f} MiB = {r['held_fraction_of_full_length']:.0%} of full length, "
              f"{r['seconds']:.1f} s, {r['prompt_tok_s']:.0f} prompt tok/s, {r['preemptions']} preemptions")
    print(f"outputs identical: {result['outputs_identical']}; on one schedule (8 x 2,000 tokens): "
          f"{result['same_schedule_outputs_identical']}")
    RESULTS.mkdir(exist_ok=True)
    for r in (sliding, one):
        r["outputs"] = [o[:8] for o in r["outputs"]]  # the first tokens, to read; the comparison used all
    (RESULTS / "sliding_window.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "sliding_window.png")


if __name__ == "__main__":
    main()
