"""CPU linear: the native packed-weight kernel (float32 and bf16 panels) vs torch's F.linear (MKL, float32).

    python -m bench.linear            # SmolLM2-135M shapes, 1..2048 rows

One pass runs every body matmul of the model (30 layers of qkv, o, gate_up,
down) plus the lm_head on the same rows, so the weights stream from memory as
in a decode step rather than sitting in cache (above 128 rows, as in a
prefill, the lm_head is left out: the engine computes logits only for each
sequence's last token). The two sides alternate per row count, so other load
on the machine hits all alike. Packing happens once, before the timing, as
at model load. bf16 panels hold the same weights rounded to bf16 and are
widened to float32 in the kernel (a bf16 model on the CPU). Writes
bench/results/linear.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.attention import time_ms
from kvmux.ops.linear import pack_weight, packed_linear

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTER, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30  # SmolLM2-135M
ROWS = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048]
HEAD_ROWS = 128  # the most rows that go through the lm_head here


def model_weights() -> list[torch.Tensor]:
    per_layer = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    return [torch.randn(n, k) for _ in range(LAYERS) for n, k in per_layer] + [torch.randn(VOCAB, HIDDEN)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads [default: all cores]")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    weights = model_weights()
    packed = [pack_weight(w) for w in weights]
    packed_bf16 = [pack_weight(w.bfloat16()) for w in weights]
    rows = []
    for m in ROWS:
        n = len(weights) if m <= HEAD_ROWS else len(weights) - 1
        inputs = {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}}
        native = time_ms(lambda: [packed_linear(inputs[w.shape[1]], p, w.shape[0])
                                  for w, p in zip(weights[:n], packed[:n])], min_runs=3)
        bf16 = time_ms(lambda: [packed_linear(inputs[w.shape[1]], p, w.shape[0])
                                for w, p in zip(weights[:n], packed_bf16[:n])], min_runs=3)
        ref = time_ms(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights[:n]], min_runs=3)
        flops = sum(2 * m * w.numel() for w in weights[:n])
        rows.append(dict(rows=m, lm_head=n == len(weights), native_ms=native, native_bf16_ms=bf16, torch_ms=ref,
                         speedup=ref / native, native_gflops=flops / native / 1e6,
                         native_bf16_gflops=flops / bf16 / 1e6, torch_gflops=flops / ref / 1e6))
        print(f"rows {m:4d}  native {rows[-1]['native_gflops']:5.1f} GFLOP/s, bf16 panels "
              f"{rows[-1]['native_bf16_gflops']:5.1f}, torch {rows[-1]['torch_gflops']:5.1f}   "
              f"native/torch x{ref / native:.2f}", flush=True)
    result = dict(command="python -m bench.linear", machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), threads=threads, torch=torch.__version__, head_rows=HEAD_ROWS,
                  weights_mib=sum(w.numel() for w in weights) * 4 / 2**20, loadavg_at_end=os.getloadavg(), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "linear.png")
    print(f"wrote {args.out / 'linear.json'} and .png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["rows"] for r in rows], [r["torch_gflops"] for r in rows], "o-", label="torch F.linear (MKL)")
    ax.plot([r["rows"] for r in rows], [r["native_gflops"] for r in rows], "o-", label="native packed_linear")
    ax.plot([r["rows"] for r in rows], [r["native_bf16_gflops"] for r in rows], "o-",
            label="native packed_linear, bf16 panels")
    ax.axvline(result["head_rows"], color="grey", ls=":", label="lm_head left out above")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (tokens in the step)")
    ax.set_ylabel("GFLOP/s over all of the model's matmuls")
    ax.set_title(f"float32 linear over {result['weights_mib']:.0f} MiB of weights, {result['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
