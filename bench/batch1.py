"""One user's decode against the memory roofline: batch-1 greedy tokens/s as a share of the read bandwidth
measured in the same run.

    python -m bench.real_shapes llama-3.2-1b --qtype q4_0
    python -m bench.batch1 --model bench/models/llama-3.2-1b.q4_0.gguf [--llama-cpp]

A decode step of one sequence reads every matmul weight once (the tied embedding as the lm_head), so its
floor is weight bytes / read bandwidth. Bandwidth: torch summing a 1 GiB float32 tensor on the same threads,
best of 5. Decode: one request, a short prompt, 129 greedy tokens with EOS ignored, through the engine's API
with its default settings; tokens/s over the 128 tokens after the first (streamed a run at a time where a step
runs several forwards), best of 3 runs. Reported: tokens/s, the weight bytes, the bandwidth, and
bytes x tokens/s / bandwidth (1.0: the roofline). With --llama-cpp, llama.cpp (the `peers`
extra) decodes the same prompt ids on the same file and threads the same way (one sequence, 129 greedy tokens,
tokens/s over the gaps after the first, best of the runs), interleaved with kvmux's runs. Writes
bench/results/batch1_<model>.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import gguf
import torch

from bench.__main__ import cpu_flags
from kvmux import Engine, SamplingParams
from kvmux.ops.threads import cpu_budget

RESULTS = Path(__file__).resolve().parent / "results"


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes/s torch reads summing a large float32 tensor on `threads` threads, best of 5."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * 2**30) // 4)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        return x.numel() * 4 / best
    finally:
        torch.set_num_threads(before)


def weight_bytes(path: Path) -> int:
    """Bytes of the matmul weights a decode step reads: every 2-D tensor (norms are 1-D, and tiny)."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2)


PROMPT = "Tell me about paging the KV cache."


def llama_cpp_rate(llm, prompt_ids: list[int], tokens: int) -> float:
    """llama.cpp's tokens/s decoding one sequence greedily after prompt_ids, over the gaps after the first token."""
    row = llm.decode([(0, 0, prompt_ids, 1)])[0]
    stamps = [time.perf_counter()]
    for i in range(tokens):
        row = llm.decode([(0, len(prompt_ids) + i, [int(row.argmax())], 1)])[0]
        stamps.append(time.perf_counter())
    llm.release(0)
    return tokens / (stamps[-1] - stamps[0])


async def decode_rates(model: str, threads: int, tokens: int, runs: int, llama_cpp: bool) -> tuple[dict, dict]:
    """Best tokens/s of kvmux (and llama.cpp), their runs interleaved; and kvmux's describe()."""
    async with Engine(model, threads=threads) as engine:
        params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
        await engine.complete("Warm up.", SamplingParams(max_tokens=8, temperature=0))
        llm = None
        if llama_cpp:
            from bench.engines.llama_cpp import LlamaCpp

            llm = LlamaCpp(model, 512, 512, 1, threads)
            prompt_ids = engine.tokenizer.tokenize(PROMPT)
            llama_cpp_rate(llm, prompt_ids, 8)  # warm up
        rates = {"kvmux": [], **({"llama-cpp": []} if llm else {})}
        try:
            for _ in range(runs):
                stamps, counts = [], []
                async for out in engine.generate(PROMPT, params):  # a step of several forwards streams a run
                    stamps.append(time.perf_counter())
                    counts.append(len(out.token_ids))
                rates["kvmux"].append((sum(counts) - counts[0]) / (stamps[-1] - stamps[0]))
                if llm:
                    rates["llama-cpp"].append(llama_cpp_rate(llm, prompt_ids, tokens))
        finally:
            if llm:
                llm.close()
        return rates, engine.describe()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.2))
    names, rates = ["roofline", "kvmux"], [report["roofline_tok_s"], report["decode_tok_s"]]
    if "llama_cpp_tok_s" in report:
        names.append("llama.cpp")
        rates.append(report["llama_cpp_tok_s"])
    ax.barh(names, rates, color=["#888", "#3a7", "#c73"][:len(names)])
    ax.set_xlabel(f"tokens/s at batch 1, {report['threads']} threads")
    ax.set_title(f"{report['model']}: {report['share_of_roofline']:.0%} of the read bandwidth "
                 f"({report['read_bandwidth_gb_s']:.1f} GB/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a .gguf file (bench.real_shapes writes some)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads [default: the CPUs kvmux may use]")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--llama-cpp", action="store_true", help="also llama.cpp on the same file (the peers extra)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    threads = args.threads or cpu_budget().threads
    load = os.getloadavg()
    bandwidth = read_bandwidth(threads)
    rates, described = asyncio.run(decode_rates(str(args.model), threads, args.tokens, args.runs, args.llama_cpp))
    rate = max(rates["kvmux"])
    nbytes = weight_bytes(args.model)
    report = {"command": f"python -m bench.batch1 --model {args.model}" + (" --llama-cpp" if args.llama_cpp else ""),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "model": args.model.name, "threads": threads, "load_avg_before": load,
              "cpu_flags": cpu_flags(),
              "weight_bytes": nbytes, "read_bandwidth_gb_s": bandwidth / 1e9, "decode_tok_s": rate,
              "roofline_tok_s": bandwidth / nbytes, "share_of_roofline": rate * nbytes / bandwidth,
              "runs_tok_s": rates, "kernels": described["kernels"]}
    if args.llama_cpp:
        report["llama_cpp_tok_s"] = max(rates["llama-cpp"])
        report["kvmux_vs_llama_cpp"] = rate / report["llama_cpp_tok_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"batch1_{args.model.stem}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"{args.model.name}: {rate:.1f} tokens/s at batch 1; {nbytes / 1e6:.0f} MB of weights per token, read "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s (roofline {bandwidth / nbytes:.1f} tokens/s): "
          f"{report['share_of_roofline']:.0%} of it." + (f" llama.cpp {report['llama_cpp_tok_s']:.1f} tokens/s: kvmux "
          f"{report['kvmux_vs_llama_cpp']:.2f}x." if args.llama_cpp else "") + f" Wrote {out}")


if __name__ == "__main__":
    main()
