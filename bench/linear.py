"""Small-batch float32 linear: the native kernel vs torch's F.linear (MKL) on a whole model's weights.

    python -m bench.linear            # SmolLM2-135M shapes, 1..64 rows

One pass runs every body matmul of the model (30 layers of qkv, o, gate_up,
down) plus the lm_head on the same rows, so the weights stream from memory as
in a decode step rather than sitting in cache. The two sides alternate per
row count, so other load on the machine hits both alike. Writes
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
from kvmux.linear import MAX_NATIVE_ROWS, small_linear

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTER, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30  # SmolLM2-135M
ROWS = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256]


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
    flops_per_row = sum(2 * w.numel() for w in weights)
    rows = []
    for m in ROWS:
        inputs = {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}}
        native = time_ms(lambda: [small_linear(inputs[w.shape[1]], w) for w in weights], min_runs=3)
        ref = time_ms(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], min_runs=3)
        rows.append(dict(rows=m, native_ms=native, torch_ms=ref, speedup=ref / native,
                         native_gflops=m * flops_per_row / native / 1e6, torch_gflops=m * flops_per_row / ref / 1e6))
        print(f"rows {m:3d}  native {native:7.1f} ms ({rows[-1]['native_gflops']:5.1f} GFLOP/s)   "
              f"torch {ref:7.1f} ms ({rows[-1]['torch_gflops']:5.1f} GFLOP/s)   x{ref / native:.2f}", flush=True)
    result = dict(command="python -m bench.linear", machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), threads=threads, torch=torch.__version__, max_native_rows=MAX_NATIVE_ROWS,
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
    ax.plot([r["rows"] for r in rows], [r["torch_ms"] for r in rows], "o-", label="torch F.linear (MKL)")
    ax.plot([r["rows"] for r in rows], [r["native_ms"] for r in rows], "o-", label="native small_linear")
    ax.axvline(result["max_native_rows"], color="grey", ls=":", label="engine switches to torch above")
    ax.set_xlabel("rows (tokens in the step)")
    ax.set_ylabel("ms for all of the model's matmuls")
    ax.set_title(f"float32 linear over {result['weights_mib']:.0f} MiB of weights, {result['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
