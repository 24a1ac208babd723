"""The GGUF files people download, kept in their blocks (issue 26): storage, decode and prefill speed, quality.

    python -m bench.kquants --model gemma-3-270m-q4_k_m.gguf   # a Q4_K_M file: Q4_K, Q5_0, Q6_K, Q8_0 tensors
    python -m bench.kquants --model llama-3.2-1b.q4_k_m.gguf --decode-only   # bench.real_shapes' random weights

In one run, on one file:
- storage: what each matmul is held as with `--quantization auto --dtype bfloat16` (no tensor dequantized; a matmul
  the file holds unquantized counts as bf16) and the MiB it takes;
- decode steps at 1, 2, 4 and 8 sequences (256-token prompts, the runner's forward and sampling, median of 16
  steps): the kept blocks (`--quantization auto --dtype bfloat16`) against the same file dequantized to bf16
  (`--quantization none --dtype bfloat16`, the path every K-quant took before), alternated over `--rounds` rounds;
  both arms hold a bf16 KV pool, so they differ in their matmuls alone (a float32 pool, the kept path's default,
  runs another attention kernel, 18% of the kept step at 8 sequences on a 2-core EPYC by py-spy: 44.8 ms a step
  against 41.3 with a bf16 pool);
- a 512-token prompt's prefill in one step, kept against bf16, best of 3 per round in the same rounds (on an AMX
  host the kept matmuls run there as amx_bf16: each chunk of a weight dequantized to bf16, AMX tiles over it);
- the ratio both as the best kept round over the best bf16 round (`speedup`) and round by round, each round's two
  arms measured one after the other (`speedup_paired`, its median `speedup_paired_median`);
- how long each takes to read its weights, which every decode step does once: the matmuls' weight bytes over the
  bytes/s torch's sum reads on the same threads (bench.batch1.read_bandwidth; a yardstick, not a bound: the bf16
  kernels, prefetching a panel ahead, have read faster);
- quality: teacher-forced next-token argmax agreement with the file dequantized to float32, over real English
  text (Python's reference documentation), for the kept blocks and for llama.cpp's own logits on the same token
  ids from the same file (when llama-cpp-python is installed).

Writes bench/results/kquants_<file>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.__main__ import cpu_flags
from bench.batch1 import read_bandwidth
from bench.efficiency import (
    RESULTS,
    agreement_with,
    decode_efficiency,
    kvmux_logits,
    matmul_shapes,
    prefill_seconds,
    text_ids,
)
from kvmux.model.loader import load_model
from kvmux.ops.threads import set_threads

BATCHES = (1, 2, 4, 8)
PREFILL_TOKENS = 512


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ap, aq) = plt.subplots(1, 3, figsize=(15, 4.5), width_ratios=[3, 1, 2])
    pre = result["prefill"]
    ap.bar([0, 1], [pre["bf16_tok_s"], pre["kept_tok_s"]], color=["#999", "#2a7"])
    ap.text(1, pre["kept_tok_s"], f"{pre['speedup']:.2f}x", ha="center", va="bottom")
    ap.set_xticks([0, 1], ["bf16", "kept"])
    ap.set_ylabel("prefill tokens/s")
    ap.set_title(f"one {pre['tokens']}-token prompt")
    rows = result["decode"]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["bf16_tok_s"] for r in rows], 0.4, label="dequantized to bf16", color="#999")
    ax.bar([i + 0.2 for i in x], [r["kept_tok_s"] for r in rows], 0.4, label="kept in blocks", color="#2a7")
    for i, r in zip(x, rows):
        ax.text(i + 0.2, r["kept_tok_s"], f"{r['speedup']:.2f}x", ha="center", va="bottom")
        for shift, name in ((-0.2, "bf16"), (0.2, "kept")):  # a step that only read its weights, at torch's pace
            pace = 1e3 * r["batch"] / result["weights_read_ms"][name]
            ax.hlines(pace, i + shift - 0.2, i + shift + 0.2, colors="k", linestyles="dashed",
                      label="weights read at torch's sum bandwidth" if i == 0 and name == "bf16" else None)
    ax.set_xticks(list(x), [f"{r['batch']} seq" for r in rows])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result['model']}: decode, {result['threads']} threads")
    ax.legend(loc="upper left")
    q = {k: v["argmax_agreement"] for k, v in result["quality"].items() if "argmax_agreement" in v}
    if not q:
        aq.set_axis_off()
        aq.set_title("quality not measured (--decode-only)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    aq.bar(list(q), [100 * v for v in q.values()], color=["#2a7", "#a52"][:len(q)])
    for i, v in enumerate(q.values()):
        aq.text(i, 100 * v, f"{100 * v:.2f}%", ha="center", va="bottom")
    aq.set_ylim(min(100 * v for v in q.values()) - 5, 100)
    aq.set_ylabel("argmax agreement with float32, %")
    aq.set_title(f"teacher-forced, {result['quality_positions']} positions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure_quality(model: str, threads: int, tokens_per_text: int) -> dict:
    """Teacher-forced argmax agreement with the file dequantized to float32: the kept blocks' (float32 activations
    and KV, the default), and llama.cpp's."""
    fp32 = load_model(model, dtype=torch.float32, quantization="none", progress=False)
    texts = text_ids(fp32.tokenizer, tokens_per_text)
    reference = [kvmux_logits(fp32.model, ids) for ids in texts]
    kept = load_model(model, progress=False)
    quality = {"kvmux_kept": agreement_with(reference, [kvmux_logits(kept.model, ids) for ids in texts])}
    try:
        from bench.engines.llama_cpp import LlamaCpp

        llm = LlamaCpp(str(model), max(map(len, texts)) + 16, max(map(len, texts)), 1, threads)
    except (RuntimeError, ValueError, ImportError) as exc:
        quality["llama_cpp"] = {"skipped": str(exc)}
    else:
        quality["llama_cpp"] = agreement_with(reference, [torch.from_numpy(llm.logits(ids)) for ids in texts])
        llm.close()
    for name, r in quality.items():
        print(f"{name}: {r}", flush=True)
    return quality


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .gguf file")
    p.add_argument("--rounds", type=int, default=2, help="decode rounds, kept and bf16 alternated [default: 2]")
    p.add_argument("--tokens-per-text", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="threads of kvmux's kernels [default: all cores]")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--decode-only", action="store_true", help="storage and decode speed, no quality measurement")
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    # As the engine runs (Engine.start): kvmux's kernels on their own pool, torch on one thread. torch's OpenMP
    # threads, spinning after each of its parallel ops, took the pool's helper's core: decode at one sequence ran
    # no faster on two threads than on one (1B Q4_K_M, 34 ms a step either way; 20.5 ms on two with this).
    torch.set_num_threads(1)
    set_threads(threads)
    load_start = os.getloadavg()

    quality = {} if args.decode_only else measure_quality(args.model, threads, args.tokens_per_text)
    kept = load_model(args.model, dtype=torch.bfloat16, progress=False)
    print(f"kept: {kept.quantization}", flush=True)

    bf16 = load_model(args.model, dtype=torch.bfloat16, quantization="none", progress=False)
    rates: dict[tuple[str, int], list[float]] = {}
    prefill: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, model in (("kept", kept.model), ("bf16", bf16.model)):
            prefill.setdefault(name, []).append(prefill_seconds(model, PREFILL_TOKENS, 3))
        for batch in BATCHES:
            for name, model in (("kept", kept.model), ("bf16", bf16.model)):
                rates.setdefault((name, batch), []).append(decode_efficiency(model, batch, 256, 16)["tokens_per_s"])
    bandwidth = read_bandwidth(threads)
    weight_bytes = {"kept": int(kept.quantization["weight_mib"] * 2**20),
                    "bf16": 2 * sum(n * k for n, k in matmul_shapes(bf16.model))}
    read_ms = {name: 1e3 * size / bandwidth for name, size in weight_bytes.items()}
    print(f"torch's sum reads {bandwidth / 1e9:.1f} GB/s: the weights in {read_ms['kept']:.1f} ms kept, "
          f"{read_ms['bf16']:.1f} ms in bf16", flush=True)
    decode = []
    for batch in BATCHES:
        k, b = max(rates["kept", batch]), max(rates["bf16", batch])
        # Each round's kept and bf16 measurements ran one after the other: their ratio shares the host's state of
        # the moment, where the best of each arm may come from different spells of a host whose memory bandwidth
        # drifts (one session's hosts moved 2x between back-to-back processes).
        paired = sorted(kr / br for kr, br in zip(rates["kept", batch], rates["bf16", batch]))
        decode.append(dict(batch=batch, kept_tok_s=k, bf16_tok_s=b, speedup=k / b,
                           speedup_paired_median=paired[len(paired) // 2], speedup_paired=paired,
                           kept_step_ms=1e3 * batch / k, bf16_step_ms=1e3 * batch / b,
                           kept_rounds=rates["kept", batch], bf16_rounds=rates["bf16", batch]))
        print(f"decode, {batch} sequences: bf16 {b:.1f} tok/s, kept {k:.1f} (x{k / b:.2f}; round by round "
              f"x{min(paired):.2f}-{max(paired):.2f}); a step {1e3 * batch / b:.1f} ms in bf16, "
              f"{1e3 * batch / k:.1f} ms kept", flush=True)

    k, b = (PREFILL_TOKENS / min(prefill[name]) for name in ("kept", "bf16"))
    prefill_result = dict(tokens=PREFILL_TOKENS, kept_tok_s=k, bf16_tok_s=b, speedup=k / b,
                          kept_rounds_s=prefill["kept"], bf16_rounds_s=prefill["bf16"])
    print(f"prefill, one {PREFILL_TOKENS}-token prompt: bf16 {b:.0f} tok/s, kept {k:.0f} (x{k / b:.2f})", flush=True)

    agreement = {k: v.get("argmax_agreement") for k, v in quality.items()}
    result = dict(command="python -m bench.kquants " + " ".join(sys.argv[1:] if argv is None else argv),
                  model=kept.name, cpu_flags=cpu_flags(), threads=threads,
                  storage=kept.quantization, kernels=kept.model.kernel_choices()["linear"], decode=decode,
                  prefill=prefill_result,
                  read_bandwidth_gb_s=bandwidth / 1e9, weight_bytes=weight_bytes, weights_read_ms=read_ms,
                  quality=quality, quality_positions=quality["kvmux_kept"]["positions"] if quality else 0,
                  targets={"decode_speedup_1_to_8": 2.0, "agreement_within_llama_cpp_points": 1.0},
                  kept_minus_llama_cpp_points=None if agreement.get("llama_cpp") is None else
                  100 * (agreement["kvmux_kept"] - agreement["llama_cpp"]),
                  loadavg_at_start=load_start, loadavg_at_end=os.getloadavg(),
                  created=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kquants_{Path(args.model).stem}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
