"""Memory-pressure benchmark: one workload on a small device pool, preempting by recompute, swap and auto.

    python -m bench.pressure            # 16 requests, 48-token prompts, 128 output tokens
    python -m bench.pressure --quick    # 8 requests, 32-token prompts, 64 output tokens

All requests arrive at once (greedy, fixed output length, so every run does
the same work) on a device pool holding about a third of what they need
together. Outputs are long next to prompts, so sequences outgrow the pool
while running and get preempted (prefill alone would just make them wait). A run on an unconstrained pool gives
the reference outputs; every mode must match it. Reports per mode: output
throughput, preemptions by kind, tokens recomputed, blocks and bytes swapped,
time spent copying and waiting on copies (on CUDA, the share of copy time
hidden behind compute); writes bench/results/pressure.json and pressure.png
(pressure_no_prefix_caching.* with --no-prefix-caching).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from kvmux import Engine, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("recompute", "swap", "auto")
COUNTERS = ("preemptions", "preemptions_swap", "preemptions_recompute", "recomputed_tokens", "prompt_tokens_computed",
            "blocks_swapped_out", "blocks_swapped_in", "block_copy_bytes", "block_copy_seconds", "block_copy_wait_seconds",
            "prefix_cache_hits_device", "prefix_cache_hits_host", "prefix_cache_hits_disk", "steps")


def build_prompts(tokenizer, num_requests: int, prompt_tokens: int) -> list[list[int]]:
    """Distinct prompts (no shared prefix), so the prefix cache does not blur the comparison."""
    words = ("pool block cache swap page token stream batch kernel memory host device prefix queue "
             "engine step decode prefill evict victim tier disk copy").split()
    rng = random.Random(0)
    prompts = []
    for _ in range(num_requests):
        ids: list[int] = []
        while len(ids) < prompt_tokens:
            ids += tokenizer.tokenize(" " + " ".join(rng.choice(words) for _ in range(32)), add_special_tokens=False)
        prompts.append(ids[:prompt_tokens])
    return prompts


async def run(prompts: list[list[int]], max_tokens: int, options: dict) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    async with Engine(**options) as engine:
        # Warm torch up, so no mode pays first-call costs.
        await engine.complete("Warm-up: count to five.", SamplingParams(max_tokens=4, temperature=0))
        before = await engine.stats()
        t0 = time.perf_counter()
        done = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
        wall = time.perf_counter() - t0
        after = await engine.stats()
        tiers = engine.blocks.tiers
        if engine.blocks.num_free != engine.blocks.num_blocks or tiers.host.num_free != tiers.host.num_blocks:
            raise RuntimeError("KV blocks leaked")
        engine.blocks.check_invariants()
    output_tokens = sum(len(c.token_ids) for c in done)
    result = {k: after[k] - before[k] for k in COUNTERS}
    result.update(wall_s=wall, output_tokens=output_tokens, output_tok_s=output_tokens / wall,
                  num_blocks=after["blocks_total"], host_blocks=after["host_blocks_total"],
                  outputs=[c.token_ids for c in done])
    if result["block_copy_seconds"] > 0:
        result["copy_hidden_share"] = 1 - result["block_copy_wait_seconds"] / result["block_copy_seconds"]
    return result


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_tok_s", "output tokens/s"), ("preemptions", "preemptions (hatched: swap)"),
              ("recomputed_tokens", "tokens recomputed"), ("block_copy_bytes", "MiB copied")]
    names = list(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        scale = 2**20 if key == "block_copy_bytes" else 1
        values = [runs[n][key] / scale for n in names]
        bars = ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:green", "tab:orange"][:len(names)])
        if key == "preemptions":
            ax.bar(names, [runs[n]["preemptions_swap"] for n in names], fill=False, hatch="//")
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.margins(y=0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 requests, 32-token prompts, 64 output tokens")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--pool-share", type=float, default=1 / 3,
                        help="device pool as a share of the blocks all requests need together")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="with it, a recompute mostly hits its own blocks, still cached on some tier")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    num_requests = args.requests or (8 if args.quick else 16)
    prompt_tokens = args.prompt_tokens or (32 if args.quick else 48)
    max_tokens = args.max_tokens or (64 if args.quick else 128)
    block_size = 16
    per_request = -(-(prompt_tokens + max_tokens) // block_size)
    num_blocks = max(per_request + 2, int(args.pool_share * num_requests * per_request))
    base = {"model": args.model, "device": args.device, "block_size": block_size,
            "enable_prefix_caching": args.prefix_caching}

    async def all_modes():
        async with Engine(args.model, num_blocks=16, device=args.device) as probe:
            prompts = build_prompts(probe.tokenizer, num_requests, prompt_tokens)
        runs = {"unconstrained": await run(prompts, max_tokens, {**base, "num_blocks": num_requests * per_request + 8})}
        for mode in MODES:
            runs[mode] = await run(prompts, max_tokens, {**base, "num_blocks": num_blocks, "preemption_mode": mode})
        return runs

    runs = asyncio.run(all_modes())
    reference = runs["unconstrained"]["outputs"]
    identical = {mode: runs[mode].pop("outputs") == reference for mode in MODES}
    runs["unconstrained"].pop("outputs")
    report = {
        "workload": {"requests": num_requests, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                     "block_size": block_size, "device_blocks": num_blocks,
                     "blocks_needed_together": num_requests * per_request, "arrival": "all at once",
                     "sampling": "greedy, ignore_eos", "prefix_caching": args.prefix_caching},
        "machine": {"device": args.device, "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "runs": runs, "outputs_identical_to_unconstrained": identical,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "pressure" if args.prefix_caching else "pressure_no_prefix_caching"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, args.out / f"{name}.png",
         f"{num_requests} requests on {num_blocks} of the {num_requests * per_request} blocks they need ({args.device})")
    for mode, r in runs.items():
        hidden = f"  hidden {r['copy_hidden_share']:.0%}" if "copy_hidden_share" in r else ""
        print(f"{mode:13}: {r['output_tok_s']:6.1f} tok/s  preemptions {r['preemptions']:3} "
              f"(swap {r['preemptions_swap']}, recompute {r['preemptions_recompute']})  "
              f"recomputed {r['recomputed_tokens']:5} tokens  copied {r['block_copy_bytes'] / 2**20:7.1f} MiB "
              f"in {r['block_copy_seconds']:.3f}s, waited {r['block_copy_wait_seconds']:.3f}s{hidden}")
    print("outputs identical to the unconstrained run:", identical)
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()
