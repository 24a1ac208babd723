"""Native paged-attention kernels against a float64 reference, across a seeded grid of shapes.

Every call writes into an output poisoned with NaN, so an element the kernel
forgets fails; the pool must hold exactly what the torch reference writes.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvmux.checks.kernels import attention_reference
from kvmux.checks.reference import LAYER, expected_pool, make_case, reference_f64
from kvmux.config import EngineConfig
from kvmux.ops import attention, kernel_choice
from kvmux.ops.cpu_attention import CpuMetadata, cpu_paged_attention

GQA = [(4, 4), (9, 3), (8, 2), (16, 2)]  # (query heads, KV heads): ratios 1, 3, 4, 8
HEAD_DIMS = [64, 128, 64, 128, 40, 256]   # 40 takes the run-time head_dim path; 256 is Gemma 3's
BLOCK_SIZES = [8, 16, 32]
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
          (torch.float32, torch.int8), (torch.bfloat16, torch.int8)]  # (activations, pool)
VARIANTS = ["avx2", "avx512bf16", "avx512vnni"]


def shapes(kind: str, bs: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(query_lens, context_lens) of one batch of the given kind."""
    if kind == "decode-first":     # context of one token
        return [1] * rng.choice([1, 3]), [1] * 3
    if kind == "decode-boundary":  # contexts ending on and around block edges
        ctx = [bs, bs + 1, 2 * bs, 2 * bs - 1, 3 * bs + 1]
        return [1] * len(ctx), ctx
    if kind == "decode-long":
        n = rng.choice([1, 2, 6])
        return [1] * n, [rng.randint(400, 1100) for _ in range(n)]
    if kind == "prefill":          # a fresh prompt chunk, no cache
        return [37], [37]
    if kind == "prefill-prefix":   # a chunk after cached blocks
        return [23, 16], [23 + 3 * bs, 16 + bs + 5]
    if kind == "small-tiles":      # drafts' verify tiles of 1-3 tokens beside decodes, odd contexts
        return [1, 2, 3, 1], [33, 301, 78, 999]
    # mixed: decodes beside prefill chunks, as the engine packs a step
    return [1, 19, 1, 1, 40], [1, 19 + 2 * bs, bs, 300, 40]


KINDS = ["decode-first", "decode-boundary", "decode-long", "prefill", "prefill-prefix", "mixed"]


def grid(n: int, seed: int = 0) -> list[tuple]:
    """n cases cycling through every axis (each value of each axis appears), combined at random."""
    rng = random.Random(seed)
    axes = [KINDS, GQA, HEAD_DIMS, BLOCK_SIZES, DTYPES]
    orders = [rng.sample(a, len(a)) for a in axes]
    return [tuple(o[(i + rng.randrange(len(o))) % len(o)] for o in orders) + (i,) for i in range(n)]


CASES = grid(60)


def case_id(c) -> str:
    kind, (hq, hkv), d, bs, (act, kv), i = c
    return f"{i}-{kind}-h{hq}/{hkv}-d{d}-bs{bs}-{str(act)[6:]}/{str(kv)[6:]}"


def tolerance(act: torch.dtype) -> dict:
    # fp32 accumulation over up to ~1000 keys; bf16 outputs carry bf16 rounding.
    return dict(atol=2e-5, rtol=1e-4) if act == torch.float32 else dict(atol=1.5e-2, rtol=1e-2)


def run_case(c, device: str, kernel, variant: str = "avx2", window: int = 0):
    kind, (hq, hkv), d, bs, (act, kv), i = c
    qlens, ctx = shapes(kind, bs, random.Random(i))
    ctx = ctx[:len(qlens)]
    case = make_case(qlens, ctx, hq, hkv, d, bs, kv, act, seed=i, device=device, window=window)
    want_pool = expected_pool(case)
    cache = case.fresh_cache()
    out = torch.full_like(case.q, float("nan"))
    extra = {"window": window} if window else {}
    got = kernel(case.q, case.k, case.v, cache, LAYER, case.batch(), case.scale, out=out, **extra)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(cache.kv.cpu(), want_pool.cpu()), "pool contents differ from the reference's writes"
    assert not torch.isnan(got).any(), "an output element was never written"
    if variant == "avx2":
        torch.testing.assert_close(got.double().cpu(), reference_f64(case, cache.kv), **tolerance(act))
        return
    # Dot products of rounded q (bf16, or int8 per row) and K, float32 sums, rounded softmax weights (bf16, or 8
    # bits per chunk): the variant's own bound, and a bf16 output's rounding.
    ref, bound = attention_reference(variant, case, cache.kv)
    bound = bound + 2e-5 + (2.0 ** -8 * ref.abs() if act == torch.bfloat16 else 0)
    excess = (got.double().cpu() - ref).abs() - bound
    assert excess.max() <= 0, f"off by {excess.max():.3g} beyond the {variant} bound"


def force_variant(variant: str, c, monkeypatch) -> None:
    """Force the attention variant through KVMUX_KERNELS, as a host without the others would run it; skip where
    this CPU or the case's pool and head_dim do not take it."""
    missing = kernel_choice.variant("attention", variant).missing()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    kind, gqa, d, bs, (act, kv), i = c
    if variant == "avx512bf16" and (kv != torch.bfloat16 or d not in (64, 128, 256)):
        pytest.skip("the avx512bf16 kernel takes a bf16 pool and head_dim 64, 128 or 256")
    if variant == "avx512vnni" and (kv != torch.int8 or d not in (64, 128, 256)):
        pytest.skip("the avx512vnni kernel takes an int8 pool and head_dim 64, 128 or 256")
    monkeypatch.setenv(kernel_choice.ENV, f"attention={variant}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_cpu_kernel_matches_float64_reference(c, variant, monkeypatch):
    """Every attention variant this CPU runs."""
    force_variant(variant, c, monkeypatch)
    run_case(c, "cpu", cpu_paged_attention, variant)


# Windows shorter than, across and longer than a block, and one wider than every context (no key is cut).
WINDOWS = [1, 5, 16, 37, 100, 5000]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("c", CASES[:24], ids=case_id)
def test_sliding_window_attention_matches_float64_reference(c, variant, monkeypatch):
    """A sliding-window layer's query sees only its last `window` keys (Gemma 3's local layers), in prefill
    chunks, decodes and mixed steps, whatever the window's alignment with blocks and key chunks."""
    force_variant(variant, c, monkeypatch)
    run_case(c, "cpu", cpu_paged_attention, variant, window=WINDOWS[c[-1] % len(WINDOWS)])


@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("gqa", [(4, 1), (6, 2), (16, 2)])
def test_bf16_kernel_reads_few_rows_in_place_and_many_from_copies(gqa, d, window, monkeypatch):
    """The avx512bf16 kernel reads K and V where they lie for a tile of up to 8 rows (its tokens times the query
    heads of a KV head) and from a transposed and an interleaved copy above that: tiles of 4, 8 and 12 rows (4
    query heads a KV head), 3, 6 and 9 (3: in-place blocks of 2 and 1 rows), 8, 16 and 24 (8), over odd contexts,
    so both paths meet partial chunks and an odd last key at every head_dim."""
    c = ("small-tiles", gqa, d, 16, (torch.bfloat16, torch.bfloat16), 0)
    force_variant("avx512bf16", c, monkeypatch)
    run_case(c, "cpu", cpu_paged_attention, "avx512bf16", window=window)


@pytest.mark.parametrize("window", WINDOWS)
def test_torch_reference_backend_applies_the_window(window):
    """The torch backend against float64 with a window, prefill and decode mixed."""
    qlens, ctx = [1, 19, 1, 1, 40], [1, 51, 16, 300, 40]
    case = make_case(qlens, ctx, 8, 2, 64, 16, torch.float32, torch.float32, seed=window, window=window)
    cache = case.fresh_cache()
    got = attention.torch_paged_attention(case.q, case.k, case.v, cache, LAYER, case.batch(), case.scale, window)
    torch.testing.assert_close(got.double(), reference_f64(case, cache.kv), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not attention.native_available(torch.device("cuda")), reason="needs a GPU and kvmux._native_cuda")
@pytest.mark.parametrize("c", CASES[:30], ids=case_id)
def test_cuda_kernel_matches_float64_reference(c):
    from kvmux.ops.cuda_attention import cuda_paged_attention

    kind, gqa, d, bs, _, i = c
    if d % 8:
        pytest.skip("the CUDA kernels need head_dim % 8 == 0")
    for dtypes in DTYPES + [(torch.float16, torch.float16), (torch.float16, torch.int8)]:
        run_case((kind, gqa, d, bs, dtypes, i), "cuda", cuda_paged_attention)


@pytest.mark.skipif(not attention.native_available(torch.device("cuda")), reason="needs a GPU and kvmux._native_cuda")
@pytest.mark.parametrize("c", [c for c in CASES[:24] if c[2] % 8 == 0], ids=case_id)
def test_cuda_sliding_window_matches_float64_reference(c):
    from kvmux.ops.cuda_attention import cuda_paged_attention

    run_case(c, "cuda", cuda_paged_attention, window=WINDOWS[c[-1] % len(WINDOWS)])


def test_one_call_serves_several_layers_and_threads():
    """The per-step plan is reused by every layer; thread counts change nothing."""
    case = make_case([1, 1, 30], [5, 70, 40], 9, 3, 64, 16, torch.float32, torch.float32, seed=3)
    batch = case.batch()
    results = []
    for threads in (1, 2, 4):
        cache = case.fresh_cache()
        batch.attn_metadata = None
        outs = [cpu_paged_attention(case.q, case.k, case.v, cache, layer, batch, case.scale) for layer in (0, 1)]
        assert isinstance(batch.attn_metadata, CpuMetadata)
        batch.attn_metadata.num_threads = threads
        outs.append(cpu_paged_attention(case.q, case.k, case.v, cache, 1, batch, case.scale))
        results.append(outs)
    for outs in results[1:]:
        for a, b in zip(outs, results[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_dispatch_by_backend_name():
    case = make_case([1, 12], [9, 12], 4, 2, 64, 8, torch.float32, torch.float32, seed=4)
    outs = {}
    for backend in attention.BACKENDS:
        batch = case.batch()
        outs[backend] = attention.paged_attention(case.q, case.k, case.v, case.fresh_cache(), LAYER, batch,
                                                  case.scale, backend)
        want = attention._TorchMetadata if backend == "torch" else CpuMetadata  # auto on CPU = native
        assert isinstance(batch.attn_metadata, want)
    torch.testing.assert_close(outs["native"], outs["torch"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.paged_attention(case.q, case.k, case.v, case.cache, LAYER, case.batch(), case.scale, "flash")


def test_bad_arguments_are_named():
    case = make_case([1, 3], [4, 3], 4, 2, 64, 8, torch.float32, torch.float32, seed=5)
    call = lambda **kw: cpu_paged_attention(**{**dict(q=case.q, k=case.k, v=case.v, kv_cache=case.fresh_cache(),  # noqa: E731
                                                      layer=LAYER, batch=case.batch(), scale=case.scale), **kw})
    with pytest.raises(ValueError, match="q: dtype"):
        call(q=case.q.half())
    with pytest.raises(ValueError, match="k: shape"):
        call(k=case.k[:, :1])
    with pytest.raises(ValueError, match="v: dtype"):
        call(v=case.v.bfloat16())
    with pytest.raises(ValueError, match="q: heads and head_dim must be contiguous"):
        call(q=case.q.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="layer"):
        call(layer=7)
    with pytest.raises(ValueError, match="out:"):
        call(out=torch.empty(1))
    bad = case.batch()
    bad.block_tables[1, 0] = 10_000
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\]"):
        call(batch=bad)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_skips_clearly_without_a_gpu(tmp_path):
    from bench import gpu_check

    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 0
    assert gpu_check.main(["--out-dir", str(tmp_path), "--require-gpu"]) == 1
    assert not list(tmp_path.iterdir())


def test_gpu_check_table_formats():
    from bench import gpu_check

    result = dict(device="Fake GPU", torch="x", cuda="y", copy_GBps=3000.0,
                  correctness=[dict(check="decode", act="bfloat16", kv="bfloat16", rel_error=1e-3,
                                    tolerance=2e-2, ok=True)],
                  timing=[dict(shape="decode", dtype="bfloat16", native_ms=0.1, torch_ms=1.0, speedup=10.0,
                               decode_GBps=2400.0, fraction_of_copy_bw=0.8, copy_GBps=3000.0),
                          dict(shape="prefill", dtype="bfloat16", native_ms=0.2, torch_ms=0.4, speedup=2.0,
                               copy_GBps=3000.0)])
    table = gpu_check.format_table(result)
    assert "| decode | bfloat16 | 0.100 | 1.000 | 10.0x | 2400 | 80% |" in table
    assert "| prefill | bfloat16 | 0.200 | 0.400 | 2.0x | - | - |" in table
