"""Checks and times the CUDA paged-attention kernels on this machine's GPU.

1. Correctness: every kernel (decode, split-context decode, prefill, prefill
   after a cached prefix, mixed batches) against a float64 reference on fresh
   random inputs, for bf16, fp16 and fp32-activations-over-bf16-KV, and each
   of those activations over an int8 pool (its k_mean random too), with and
   without a sliding window; the pool must hold exactly what the torch
   reference writes.
2. Speed: native vs the torch reference (CUDA events, median of runs), and the
   decode kernel's achieved bandwidth (K/V bytes it must read / time) as a
   fraction of the card's measured device-to-device copy bandwidth.

Writes bench/results/gpu_check_<card>.json and .md. Without a GPU it says so
and exits 0 (or 1 with --require-gpu). Run through bench/gpu_check.sh, which
builds the extension first.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmux.checks.reference import LAYER, NUM_LAYERS, expected_pool, make_case, reference_f64  # noqa: E402

# Relative error (max |out - ref| / max |ref|) allowed per activation dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
               (torch.bfloat16, torch.int8), (torch.float16, torch.int8), (torch.float32, torch.int8)]

# (name, query_lens, context_lens, Hq, Hkv, D, block_size[, window])
CHECKS = [
    ("decode ctx=1", [1, 1], [1, 1], 9, 3, 64, 16),
    ("decode block edges", [1] * 4, [16, 17, 32, 31], 8, 2, 128, 16),
    ("decode split ctx", [1, 1, 1], [255, 257, 3000], 32, 8, 128, 16),
    ("decode gqa1", [1] * 5, [100, 600, 7, 256, 512], 8, 8, 64, 32),
    ("decode gqa16", [1] * 2, [900, 40], 32, 2, 64, 8),
    ("prefill", [77], [77], 9, 3, 64, 16),
    ("prefill+prefix", [40, 33], [300, 33 + 64], 32, 8, 128, 16),
    ("mixed", [1, 50, 1, 1, 20], [1, 70, 1000, 16, 20], 12, 4, 64, 8),
    ("decode window 512", [1] * 4, [700, 40, 513, 3000], 4, 1, 256, 16, 512),
    ("decode window 300", [1] * 4, [700, 301, 3000, 299], 8, 2, 128, 16, 300),  # a partial last partition
    ("prefill window 37", [90], [90], 8, 2, 64, 16, 37),
    ("mixed window 100", [1, 50, 1, 1, 20], [1, 170, 1000, 16, 20], 12, 4, 64, 8, 100),
]

# Timed shapes: (name, batch, ctx, qlen, Hq, Hkv, D)
TIMINGS = [
    ("SmolLM2 decode b64 ctx512", 64, 512, 1, 9, 3, 64),
    ("SmolLM2 decode b64 ctx1024", 64, 1024, 1, 9, 3, 64),
    ("Llama-8B decode b1 ctx8192", 1, 8192, 1, 32, 8, 128),
    ("Llama-8B decode b8 ctx4096", 8, 4096, 1, 32, 8, 128),
    ("Llama-8B decode b64 ctx2048", 64, 2048, 1, 32, 8, 128),
    ("SmolLM2 prefill 512", 1, 512, 512, 9, 3, 64),
    ("Llama-8B prefill 512 after 1536", 1, 2048, 512, 32, 8, 128),
]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_correctness(seed: int) -> list[dict]:
    from kvmux.ops.cuda_attention import cuda_paged_attention

    rows = []
    for i, (name, qlens, ctx, hq, hkv, d, bs, *window) in enumerate(CHECKS):
        window = window[0] if window else 0
        for act, kv in DTYPE_PAIRS:
            case = make_case(qlens, ctx, hq, hkv, d, bs, kv, act, seed=seed + i, device="cuda", window=window)
            if kv == torch.int8:  # an int8 pool's K offset, which its writer subtracts
                case.cache.k_mean = torch.randn(NUM_LAYERS, hkv, d, generator=torch.Generator().manual_seed(i)).cuda()
            want_pool = expected_pool(case)
            cache = case.fresh_cache()
            out = torch.full_like(case.q, float("nan"))
            cuda_paged_attention(case.q, case.k, case.v, cache, LAYER, case.batch(), case.scale, out=out,
                                 window=window)
            torch.cuda.synchronize()
            err = rel_error(out, reference_f64(case, cache.kv))
            ok = bool(torch.equal(cache.kv, want_pool)) and not out.isnan().any().item() and err <= TOLERANCE[act]
            rows.append(dict(check=name, act=str(act)[6:], kv=str(kv)[6:], rel_error=err,
                             tolerance=TOLERANCE[act], ok=ok))
    return rows


def cuda_time_ms(fn, iters: int) -> float:
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:  # warm-up
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), on 1 GiB."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms / 1e3)


def time_kernels(iters: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> list[dict]:
    from kvmux.ops.attention import torch_paged_attention
    from kvmux.ops.cuda_attention import cuda_paged_attention

    peak = copy_bandwidth()
    rows = []
    for name, batch, ctx, qlen, hq, hkv, d in TIMINGS:
        kv = kv_dtype or dtype
        case = make_case([qlen] * batch, [ctx] * batch, hq, hkv, d, 16, kv, dtype, seed=0, device="cuda")
        cache = case.fresh_cache()
        # The batch (and so the per-step plan) is built once: a layer's cost is what is timed.
        b_native, b_torch = case.batch(), case.batch()
        native = cuda_time_ms(lambda: cuda_paged_attention(case.q, case.k, case.v, cache, LAYER, b_native,
                                                           case.scale), iters)
        ref = cuda_time_ms(lambda: torch_paged_attention(case.q, case.k, case.v, cache, LAYER, b_torch,
                                                         case.scale), iters)
        row = dict(shape=name, dtype=str(dtype)[6:] + ("" if kv == dtype else f" / {str(kv)[6:]} KV"),
                   native_ms=native, torch_ms=ref, speedup=ref / native)
        if qlen == 1:
            row_bytes = d + 2 if kv == torch.int8 else d * cache.kv.element_size()  # int8: its float16 scale
            kv_bytes = batch * ctx * hkv * 2 * row_bytes
            row["decode_GBps"] = kv_bytes / (native / 1e3) / 1e9
            row["fraction_of_copy_bw"] = kv_bytes / (native / 1e3) / peak
        rows.append(row)
    for row in rows:
        row["copy_GBps"] = peak / 1e9
    return rows


def format_table(result: dict) -> str:
    lines = [f"# CUDA paged attention on {result['device']}", "",
             f"torch {result['torch']}, CUDA {result['cuda']}; device-to-device copy "
             f"{result['copy_GBps']:.0f} GB/s", "", "## Correctness (relative to a float64 reference)", "",
             "| check | act | kv | rel. error | tolerance | ok |", "|---|---|---|---|---|---|"]
    for r in result["correctness"]:
        lines.append(f"| {r['check']} | {r['act']} | {r['kv']} | {r['rel_error']:.2e} | {r['tolerance']:.0e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", "## Timing per layer (median)", "",
              "| shape | dtype | native ms | torch ms | speedup | decode GB/s | of copy bw |",
              "|---|---|---|---|---|---|---|"]
    for r in result["timing"]:
        bw = f"{r['decode_GBps']:.0f} | {r['fraction_of_copy_bw']:.0%}" if "decode_GBps" in r else "- | -"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['native_ms']:.3f} | {r['torch_ms']:.3f} | "
                     f"{r['speedup']:.1f}x | {bw} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--iters", type=int, default=20, help="timed runs per shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--require-gpu", action="store_true", help="fail (exit 1) instead of skipping without a GPU")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; skipping (nothing written)")
        return 1 if args.require_gpu else 0
    try:
        import kvmux._native_cuda  # noqa: F401
    except ImportError as e:
        print(f"gpu_check: kvmux._native_cuda is not built ({e}); run: python setup.py build_ext --inplace")
        return 1

    correctness = check_correctness(args.seed)
    timing = (time_kernels(args.iters, torch.bfloat16) + time_kernels(args.iters, torch.float16)
              + time_kernels(args.iters, torch.bfloat16, torch.int8))
    device = torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda,
                  copy_GBps=timing[0]["copy_GBps"], correctness=correctness, timing=timing)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ("gpu_check_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(result)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    failed = [r for r in correctness if not r["ok"]]
    if failed:
        print(f"gpu_check: {len(failed)} correctness checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
