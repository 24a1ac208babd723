"""CPU linear: every matmul kernel variant this CPU runs, float32 and bf16 weights, vs torch's float32 F.linear.

    python -m bench.linear            # SmolLM2-135M shapes, 1..2048 rows

One pass runs every body matmul of the model (30 layers of qkv, o, gate_up,
down) plus the lm_head on the same rows, so the weights stream from memory as
in a decode step rather than sitting in cache (above 128 rows, as in a
prefill, the lm_head is left out: the engine computes logits only for each
sequence's last token). The variants alternate per row count, so other load
on the machine hits all alike. Packing happens once, before the timing, as at
model load. The variants are kernel_choice.VARIANTS' linear ones: `avx2` on
float32 panels is the float32 model's kernel; on bf16 panels it widens them
to float32; `avx512bf16` and `amx` multiply bf16 with float32 sums; `onednn`
is torch's F.linear in bf16 (bf16 results, so the engine runs it only when
KVMUX_KERNELS names it). The engine times the others per shape and row range
at load and keeps the fastest (kvmux/ops/linear.py). Writes
bench/results/linear.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bench.attention import time_ms
from bench.cpu_check import cpu_flags
from kvmux.ops import kernel_choice
from kvmux.ops.linear import matmul, pack_weight
from kvmux.ops.threads import set_threads

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTER, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30  # SmolLM2-135M
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
HEAD_ROWS = 128  # the most rows that go through the lm_head here


def model_weights() -> list[torch.Tensor]:
    per_layer = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    return [torch.randn(n, k) for _ in range(LAYERS) for n, k in per_layer] + [torch.randn(VOCAB, HIDDEN)]


def layers(weights: list[torch.Tensor], dtype: torch.dtype) -> list[SimpleNamespace]:
    return [SimpleNamespace(weight=pack_weight(w.to(dtype)), bias=None, dense=None, in_features=w.shape[1],
                            out_features=w.shape[0], weight_format=str(dtype).removeprefix("torch."))
            for w in weights]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="threads of torch and of kvmux's kernels [default: all cores]")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts [default: %(default)s]")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # torch's side of the comparisons
    set_threads(threads)  # kvmux's kernels
    weights = model_weights()
    packed = {dtype: layers(weights, dtype) for dtype in (torch.float32, torch.bfloat16)}
    # (label, matmuls over every weight) per variant this CPU runs, and torch's float32 F.linear.
    variants = {f"{v.name} {fmt}": [matmul(v.name, layer) for layer in packed[getattr(torch, fmt)]]
                for fmt in ("float32", "bfloat16") for v in kernel_choice.runnable("linear", fmt)}
    variants["torch float32"] = [lambda x, w=w: F.linear(x, w) for w in weights]
    rows = []
    for m in map(int, args.rows.split(",")):
        n = len(weights) if m <= HEAD_ROWS else len(weights) - 1
        inputs = {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}}
        flops = sum(2 * m * w.numel() for w in weights[:n])
        ms = {label: time_ms(lambda fns=fns: [fn(inputs[w.shape[1]]) for fn, w in zip(fns[:n], weights)], min_runs=2)
              for label, fns in variants.items()}
        gflops = {label: flops / t / 1e6 for label, t in ms.items()}
        rows.append(dict(rows=m, lm_head=n == len(weights), ms=ms, gflops=gflops,
                         vs_native_float32={label: ms["avx2 float32"] / t for label, t in ms.items()}))
        print(f"rows {m:4d}  " + "  ".join(f"{label} {g:6.1f}" for label, g in gflops.items()) + "  GFLOP/s",
              flush=True)
    result = dict(command="python -m bench.linear", machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), threads=threads, torch=torch.__version__, cpu_flags=cpu_flags(),
                  head_rows=HEAD_ROWS, weights_mib=sum(w.numel() for w in weights) * 4 / 2**20,
                  loadavg_at_end=os.getloadavg(), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "linear.png")
    print(f"wrote {args.out / 'linear.json'} and .png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label in rows[0]["gflops"]:
        ax.plot([r["rows"] for r in rows], [r["gflops"][label] for r in rows], "o-", ms=3, label=label)
    ax.axvline(result["head_rows"], color="grey", ls=":", label="lm_head left out above")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows (tokens in the step)")
    ax.set_ylabel("GFLOP/s over all of the model's matmuls")
    ax.set_title(f"linear over SmolLM2-135M's weights, {result['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
