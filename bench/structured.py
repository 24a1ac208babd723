"""Structured outputs' cost: the same requests with and without a JSON schema, and the first token's wait for a
schema's compile, in one run.

    python -m bench.structured            # 64 requests of the bench workload, the default model
    python -m bench.structured --quick    # 16 requests

Throughput: the bench's seeded workload (kvmux bench's prompts and output lengths), all at once, greedy,
unconstrained and with one JSON schema on every request, alternated twice. The schema (records of ids, enums and strings)
cannot be complete within 256 tokens, so every request in both runs produces exactly its output length: the
ratio of output tokens/s is the constraint's cost alone (the masks filled per step, the masking), not a
change in work. Also reported: the mask thread's seconds and how long sampling waited for it, against the
step time.

First token: requests one after another, each with a schema of its own (compiled on arrival) and then each
with one schema already compiled (a cache hit), short prompts, 4 output tokens; p50 and p99 of the time to
the first token. Writes bench/results/structured.json and structured.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from bench.__main__ import hf_folder, vocabulary
from bench.workload import WorkloadSpec, describe, make_workload
from kvmux import Engine, SamplingParams
from kvmux.sampling import StructuredOutputs

RESULTS = Path(__file__).resolve().parent / "results"

RECORDS = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "records": {"type": "array", "minItems": 200, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "kind": {"enum": ["cache", "block", "swap", "prefix"]},
                           "note": {"type": "string", "maxLength": 24}},
            "required": ["id", "kind", "note"], "additionalProperties": False}},
    },
    "required": ["title", "records"],
    "additionalProperties": False,
}


def schema_number(i: int) -> dict:
    """A schema of its own for request i: another property name, so its text (the cache key) differs."""
    return {"type": "object", "properties": {f"field_{i}": {"type": "integer"}, "kind": {"enum": ["a", "b"]}},
            "required": [f"field_{i}", "kind"], "additionalProperties": False}


async def throughput(engine: Engine, requests, constrained: bool) -> dict:
    before = await engine.stats()
    constraint = StructuredOutputs(json=RECORDS) if constrained else None

    async def one(r):
        params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True, structured_outputs=constraint)
        return await engine.complete(r.prompt_ids, params)

    started = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - started
    after = await engine.stats()
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float)) and
             (k.startswith("structured_") or k in ("steps", "step_seconds", "forward_seconds", "output_tokens"))}
    lengths = [c.num_output_tokens for c in done]
    assert lengths == [r.output_len for r in requests], "a request ended before its output length"
    if constrained:  # what was generated is the schema's start: a prefix of a valid document
        assert all(c.text.startswith('{"title":"') for c in done)
    return {"seconds": elapsed, "output_tokens": sum(lengths), "out_tok_s": sum(lengths) / elapsed, **delta}


async def first_tokens(engine: Engine, prompt: list[int], count: int, fresh: bool) -> list[float]:
    """Each request's wait for its first token: with a schema never seen (fresh), or with one compiled before."""
    if not fresh:
        await engine.complete(prompt, SamplingParams(max_tokens=1, structured_outputs=StructuredOutputs(
            json=schema_number(-1))))
    waits = []
    for i in range(count):
        schema = schema_number(i) if fresh else schema_number(-1)
        params = SamplingParams(max_tokens=4, temperature=0, structured_outputs=StructuredOutputs(json=schema))
        started = time.perf_counter()
        async for _ in engine.generate(prompt, params):
            waits.append(time.perf_counter() - started)
            break
    return waits


def merged(runs: list[dict]) -> dict:
    """Two runs of one setting as one: their sums, and the throughput of both together."""
    total = {k: sum(r[k] for r in runs) for k in runs[0]}
    total["out_tok_s"] = total["output_tokens"] / total["seconds"]
    total["runs_out_tok_s"] = [round(r["out_tok_s"], 1) for r in runs]
    return total


def percentiles(values: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(values, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(values, 99)) * 1e3, 2), "n": len(values)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    runs = report["throughput"]
    left.bar(["unconstrained", "JSON schema"], [runs["unconstrained"]["out_tok_s"], runs["constrained"]["out_tok_s"]],
             color=["#888", "#3a7"])
    left.set_ylabel("output tokens/s")
    left.set_title(f"{report['workload']['requests']} requests: {report['ratio']:.1%}")
    ttft = report["first_token"]
    x = np.arange(2)
    right.bar(x - 0.2, [ttft["new_schema"]["p50_ms"], ttft["cached_schema"]["p50_ms"]], 0.4, label="p50")
    right.bar(x + 0.2, [ttft["new_schema"]["p99_ms"], ttft["cached_schema"]["p99_ms"]], 0.4, label="p99")
    right.set_xticks(x, ["new schema\n(compiled)", "cached schema"])
    right.set_ylabel("time to first token, ms")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 requests, 16 first-token probes")
    p.add_argument("--requests", type=int, default=None, help="requests of the throughput runs [default: 64]")
    p.add_argument("--model", default=None, help="safetensors folder or .gguf (default: the default model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args()
    n = args.requests or (16 if args.quick else 64)
    probes = 16 if args.quick else 48
    vocab, special = vocabulary(hf_folder(args.model))
    requests = make_workload(WorkloadSpec(num_requests=n), vocab, special)

    async def run() -> dict:
        # No prefix caching: every run prefills its prompts anew, so the runs do the same work whatever their order.
        async with Engine(args.model, threads=args.threads, max_num_batched_tokens=2048,
                          enable_prefix_caching=False) as engine:
            # Warm-up: torch's first calls, the kernels, and llguidance's tokenizer (built on first use).
            await engine.complete("Warm up.", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(
                choice=["ok"])))
            # Alternated, twice, so that neither setting runs only on a warmer or quieter machine.
            runs = [await throughput(engine, requests, constrained=c) for c in (False, True, False, True)]
            plain, constrained = merged(runs[0::2]), merged(runs[1::2])
            prompt = requests[0].prompt_ids[:32]
            fresh = await first_tokens(engine, prompt, probes, fresh=True)
            cached = await first_tokens(engine, prompt, probes, fresh=False)
            return {"describe": engine.describe()["model"], "unconstrained": plain, "constrained": constrained,
                    "new_schema": percentiles(fresh), "cached_schema": percentiles(cached)}

    result = asyncio.run(run())
    step = result["constrained"]["step_seconds"]
    report = {
        "command": "python -m bench.structured" + (" --quick" if args.quick else ""),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": result["describe"],
        "cpu_flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx", "amx"))}),
        "workload": describe(requests),
        "throughput": {"unconstrained": result["unconstrained"], "constrained": result["constrained"]},
        "ratio": result["constrained"]["out_tok_s"] / result["unconstrained"]["out_tok_s"],
        "mask_share_of_step_time": result["constrained"].get("structured_mask_seconds", 0.0) / step,
        "mask_wait_share_of_step_time": result["constrained"].get("structured_mask_wait_seconds", 0.0) / step,
        "first_token": {"new_schema": result["new_schema"], "cached_schema": result["cached_schema"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "structured.png")
    print(f"unconstrained {report['throughput']['unconstrained']['out_tok_s']:.1f} out tok/s, JSON schema "
          f"{report['throughput']['constrained']['out_tok_s']:.1f}: {report['ratio']:.1%}; masks "
          f"{report['mask_share_of_step_time']:.2%} of step time on their thread, sampling waited "
          f"{report['mask_wait_share_of_step_time']:.2%}")
    print(f"first token, new schema p50 {report['first_token']['new_schema']['p50_ms']} ms p99 "
          f"{report['first_token']['new_schema']['p99_ms']} ms; cached p50 "
          f"{report['first_token']['cached_schema']['p50_ms']} ms p99 {report['first_token']['cached_schema']['p99_ms']} ms")
    print(f"wrote {args.out / 'structured.json'} and structured.png")


if __name__ == "__main__":
    main()
