"""CPU quantized linear: every int8 kernel variant this CPU runs, on each quantized form, vs float32 panels.

    python -m bench.quant                      # SmolLM2-135M shapes, 1..2048 rows
    python -m bench.quant --rows 1,8,64 --types q4_1

As bench.linear: one pass runs every body matmul of the model plus the lm_head
on the same rows (above 128 rows the lm_head is left out), so the weights
stream from memory as in a decode step. Variants and the float32 baseline
(the native packed kernel) alternate per row count, so other load on the
machine hits all alike; the ratios are what to read on a shared machine.
Writes bench/results/quant.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from bench.attention import time_ms
from bench.linear import HEAD_ROWS, ROWS, model_weights
from kvmux.checks.reference import random_gguf_blocks
from kvmux.ops import kernel_choice, quant
from kvmux.ops.gguf_blocks import GGUF_BLOCK
from kvmux.ops.linear import pack_weight, packed_linear
from kvmux.ops.threads import set_threads

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="threads of torch and of kvmux's kernels [default: all cores]")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts [default: %(default)s]")
    p.add_argument("--types", default=None, help="quantized forms [default: those whose GGUF block (Q6_K: 256 "
                   "values) divides every shape's K: q8_0,q4_0,q4_1,q5_0,q5_1 for SmolLM2]")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # torch's side of the comparisons
    set_threads(threads)  # kvmux's kernels
    weights = model_weights()
    shapes = [tuple(w.shape) for w in weights]
    packed = [pack_weight(w) for w in weights]
    del weights
    g = torch.Generator().manual_seed(0)
    fits = [t for t in quant.QTYPES if all(k % GGUF_BLOCK[t.upper()][1] == 0 for _, k in shapes)]
    qtypes = args.types.split(",") if args.types else fits
    if unfit := sorted(set(qtypes) - set(fits)):
        p.error(f"--types {','.join(unfit)}: their GGUF blocks do not divide these shapes' in_features "
                f"{sorted({k for _, k in shapes})}")
    quantized = {t: [quant.pack_blocks(t, random_gguf_blocks(t, n, k, g)) for n, k in shapes] for t in qtypes}
    entries = [v for v in kernel_choice.VARIANTS if v.op == "linear" and "q8_0" in v.formats]
    variants = [v.name for v in entries if not v.missing()]
    skipped = {v.name: v.missing() for v in entries if v.missing()}
    rows = []
    for m in map(int, args.rows.split(",")):
        n = len(shapes) if m <= HEAD_ROWS else len(shapes) - 1
        inputs = {k: torch.randn(m, k) for _, k in shapes}
        row = dict(rows=m, lm_head=n == len(shapes))
        row["float32_ms"] = time_ms(lambda: [packed_linear(inputs[k], w, nn)
                                             for (nn, k), w in zip(shapes[:n], packed[:n])], min_runs=3)
        for t in qtypes:
            for v in variants:
                row[f"{t}_{v}_ms"] = time_ms(lambda: [quant.quant_linear(inputs[w.in_features], w, kernel=v)
                                                      for w in quantized[t][:n]], min_runs=3)
        rows.append(row)
        print(f"rows {m:4d}  float32 {row['float32_ms']:7.2f} ms  " + "  ".join(
            f"{t}/{v} x{row['float32_ms'] / row[f'{t}_{v}_ms']:.2f}" for t in qtypes for v in variants), flush=True)
    result = dict(command="python -m bench.quant " + " ".join(argv or []),
                  machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=threads,
                  cpu_features=[f for f, on in kernel_choice.cpu_features().items() if on], variants=variants,
                  skipped={v: f"needs {', '.join(f)}" for v, f in skipped.items()}, types=qtypes,
                  loadavg_at_end=os.getloadavg(), rows=rows)
    write(result, args.out / "quant.json")


def write(result: dict, path: Path) -> None:
    """The JSON and, beside it, its figure: speed-up over float32 per type and variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in result["types"]:
        for v in result["variants"]:
            ax.plot([r["rows"] for r in rows], [r["float32_ms"] / r[f"{t}_{v}_ms"] for r in rows], "o-",
                    label=f"{t} {v}")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (tokens in the step)")
    ax.set_ylabel("speed-up over float32 packed_linear")
    ax.set_title(f"quantized linear over the model's matmuls, {result['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
