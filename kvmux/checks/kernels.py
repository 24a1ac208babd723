"""Every CPU kernel variant's check: fresh random inputs, its float64 reference, and the error it may have.

One `KernelCheck` per (op, variant, format) in `CHECKS`. The suite runs each
one the CPU supports (tests/test_kernel_checks.py; the others skip, naming the
instruction set), and `python -m bench.cpu_check` runs them all and times each
against torch on the same inputs. A new kernel joins both with its Variant in
kernel_choice.VARIANTS and one entry here (reusing a trial builder where its
op has one: `linear_trials` takes any weight format `matmul` knows).

A trial's bound is what the variant's arithmetic allows, not a loose
tolerance: float32 sums (2^-20 of the sum of |terms|), plus whatever the variant
rounds (x rounded to bf16 is rounded in the reference too, so it costs
nothing; a bf16 output costs 2^-8 of it; attention's softmax weights rounded to
bf16 cost weight_rounding_bound, to 8 bits u8_weight_bound; a quantized matmul's
activations, and the int8 attention's 16-bit q, are quantized in the reference exactly
as the kernel quantizes them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kvmux.checks.reference import (
    LAYER,
    expected_pool,
    make_case,
    quant_linear_bf16_f64,
    quant_linear_f64,
    random_gguf_blocks,
    reference_f64,
    u8_weight_bound,
    weight_rounding_bound,
)
from kvmux.ops import kernel_choice, quant
from kvmux.ops.attention import torch_paged_attention
from kvmux.ops.cpu_attention import CpuMetadata, cpu_paged_attention
from kvmux.ops.gguf_blocks import FORM_OF, GGUF_BLOCK
from kvmux.ops.linear import matmul, pack_weight
from kvmux.ops.quant import pack_blocks

SUM_ERROR = 2.0 ** -20  # float32 sums: relative to the sum of |terms| (~16 ulp; a wrong term costs ~1)
BF16_ERROR = 2.0 ** -8  # a value rounded to bf16: twice its largest relative error


@dataclass
class Trial:
    """One call of a kernel variant on fresh inputs, and what it must equal."""

    label: str
    run: Callable[[], torch.Tensor]
    reference: torch.Tensor  # float64
    bound: torch.Tensor      # |run() - reference| <= bound, element by element
    baseline: Callable[[], object]  # torch doing the same work, for timing

    def check(self) -> dict:
        got = self.run().double()
        error = (got - self.reference).abs()
        ratio = float((error / self.bound).max()) if error.numel() else 0.0
        return {"max_error": float(error.max()) if error.numel() else 0.0, "error_vs_bound": ratio,
                "ok": bool(torch.isfinite(got).all()) and ratio <= 1.0}


@dataclass(frozen=True)
class KernelCheck:
    op: str
    variant: str
    fmt: str  # the weight format (linear: a dtype or a GGUF block type) or KV dtype (attention)
    trials: Callable[[str, str, int], list[Trial]]  # (variant, fmt, seed) -> trials on fresh inputs

    @property
    def name(self) -> str:
        return f"{self.op}/{self.variant}/{self.fmt}"

    def missing(self) -> list[str]:
        """Instruction sets this CPU lacks for the variant (empty: it runs here)."""
        return kernel_choice.variant(self.op, self.variant, self.fmt).missing()


# (rows, in, out, bias): decode and prefill shapes, partial row tiles and last panels, K split in several
# passes (1300, 1536) or padded for bf16 (577, 40, 7), more rows than one row block (200), the 1 x 1 corner.
LINEAR_SHAPES = [(1, 576, 960, False), (3, 576, 1536, True), (4, 1536, 576, False), (5, 577, 1001, True),
                 (13, 64, 7, False), (33, 576, 3072, False), (64, 1300, 50, True), (200, 40, 50, False),
                 (2, 7, 1, True), (1, 1, 1, False)]
ROUNDS_X = {"avx512bf16", "amx", "onednn"}  # multiply x rounded to bf16
ROUNDS_OUT = {"onednn"}                     # return a bf16 result (widened); oneDNN's may be off by a bf16 ulp


def linear_trials(variant: str, fmt: str, seed: int) -> list[Trial]:
    trials = []
    for i, (rows, k, n, with_bias) in enumerate(LINEAR_SHAPES):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        x = torch.randn(rows, k, generator=gen)
        weight = torch.randn(n, k, generator=gen).to(getattr(torch, fmt))
        bias = torch.randn(n, generator=gen) if with_bias else None
        layer = SimpleNamespace(weight=pack_weight(weight), bias=bias, dense=None, in_features=k, out_features=n,
                                weight_format=fmt)
        xr = (x.bfloat16() if variant in ROUNDS_X else x).double()
        w = weight.double()  # bf16 weights are exact in float64
        product = xr @ w.T
        ref = product + (bias.double() if with_bias else 0)
        bound = SUM_ERROR * (xr.abs() @ w.abs().T + (bias.double().abs() if with_bias else 0)) + 1e-30
        if variant in ROUNDS_OUT:  # the product is rounded, then the bias added
            bound = bound + 2 * BF16_ERROR * product.abs()
        dense = weight.to(x.dtype if fmt == "float32" else weight.dtype)
        baseline = (lambda x=x, d=dense, b=bias: F.linear(x.to(d.dtype), d, None if b is None else b.to(d.dtype)))
        trials.append(Trial(f"{rows} x {k} -> {n}{' + bias' if with_bias else ''}",
                            lambda fn=matmul(variant, layer), x=x: fn(x), ref, bound, baseline))
    return trials


# (rows, out, in): decode and prefill rows, partial tiles and panels, several row blocks; K in 32-value blocks.
QUANT_SHAPES = [(1, 16, 32), (2, 40, 96), (5, 96, 576), (9, 200, 1536), (70, 48, 64), (131, 33, 128)]
EPS32 = 2.0 ** -23


def quant_sum_bound(k: int, magnitude: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What float32 rounding may leave of a quantized matmul whose activations the reference quantizes as the
    kernel does: a few ulps per block of 32 of the sum of |terms| (quant_linear_f64's magnitude)."""
    return (k // 32 + 4) * EPS32 * (magnitude + bias.abs().double())


def quant_trials(variant: str, fmt: str, seed: int) -> list[Trial]:
    """x quantized per block exactly as the kernel does is part of the reference, so what is left is float32
    rounding: a few ulps per block of the sum of |terms|. The bf16 variants' reference rounds x and the weight
    to bf16 as they do, which leaves float32 sums as linear_trials'."""
    trials = []
    # Each form on every GGUF type read into it: Q4_1's also from Q4_K, Q5_1's from Q5_K, whose activations
    # the int8 tiles quantize over spans (QuantWeight.span); a K-quant's K is whole super-blocks of 256.
    for gguf_type in [t for t, form in FORM_OF.items() if form == fmt]:
        values = GGUF_BLOCK[gguf_type][1]
        for i, (rows, n, k) in enumerate(QUANT_SHAPES):
            k = -(-k // values) * values
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            raw = random_gguf_blocks(gguf_type, n, k, gen)
            x = torch.randn(rows, k, generator=gen)
            bias = torch.randn(n, generator=gen)
            weight = pack_blocks(gguf_type, raw)
            layer = SimpleNamespace(quant=weight, bias=bias, weight_format=fmt)
            if variant in quant.BF16_KERNELS:
                ref, magnitude = quant_linear_bf16_f64(gguf_type, raw, x, bias)
                bound = SUM_ERROR * (magnitude + bias.double().abs()) + 1e-30
            else:
                ref, magnitude = quant_linear_f64(gguf_type, raw, x, bias, weight.span)
                bound = quant_sum_bound(k, magnitude, bias) + 1e-30
            dense = weight.dequantize()
            trials.append(Trial(f"{gguf_type}: {rows} x {k} -> {n} + bias",
                                lambda fn=matmul(variant, layer), x=x: fn(x), ref, bound,
                                lambda x=x, d=dense, b=bias: F.linear(x, d, b)))
    return trials


# (label, query lens, context lens): first decode tokens, decodes across block edges and long contexts,
# a fresh prompt chunk, a chunk after a cached prefix, and decodes beside chunks as the engine packs a step.
ATTENTION_SHAPES = [("decode", [1, 1, 1, 1], [1, 17, 300, 1000]), ("prefill", [37], [37]),
                    ("prefill after prefix", [23, 16], [71, 37]), ("mixed", [1, 19, 1, 40], [1, 51, 16, 40])]


def attention_trials(variant: str, fmt: str, seed: int) -> list[Trial]:
    trials = []
    for i, (label, qlens, ctx) in enumerate(ATTENTION_SHAPES):
        for heads, kv_heads, head_dim in ((9, 3, 64), (8, 2, 128)):  # SmolLM2's heads; a wider head
            case = make_case(qlens, ctx, heads, kv_heads, head_dim, 16, getattr(torch, fmt), torch.float32,
                             seed=seed * 1000 + 2 * i + (head_dim == 128))
            pool = expected_pool(case)
            ref, bound = attention_reference(variant, case, pool)
            trials.append(Trial(f"{label}, {heads}/{kv_heads} heads x {head_dim}",
                                _attention_run(case, variant), ref, bound + 2e-5, _attention_baseline(case)))
    return trials


def attention_reference(variant: str, case, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, bound on |output - reference| less 2e-5) for the attention variant over the pool it left: exact
    float32 sums (avx2); bf16 q and softmax weights (avx512bf16); 16-bit q and 8-bit weights (avx512vnni)."""
    if variant == "avx512bf16":
        return reference_f64(case, pool, "bf16"), 2 * weight_rounding_bound(case, pool)
    if variant == "avx512vnni":
        ref = reference_f64(case, pool, "int16")
        return ref, 1.01 * u8_weight_bound(case, pool) + 1e-4 * ref.abs()
    ref = reference_f64(case, pool)
    return ref, 1e-4 * ref.abs()


def _attention_run(case, variant: str) -> Callable[[], torch.Tensor]:
    cache, batch = case.fresh_cache(), case.batch()
    batch.attn_metadata = CpuMetadata(batch, cache, variant)  # planned once, as for a step's layers
    return lambda: cpu_paged_attention(case.q, case.k, case.v, cache, LAYER, batch, case.scale)


def _attention_baseline(case) -> Callable[[], torch.Tensor]:
    cache, batch = case.fresh_cache(), case.batch()
    return lambda: torch_paged_attention(case.q, case.k, case.v, cache, LAYER, batch, case.scale)


CHECKS: tuple[KernelCheck, ...] = (
    KernelCheck("linear", "avx2", "float32", linear_trials),
    KernelCheck("linear", "avx2", "bfloat16", linear_trials),
    KernelCheck("linear", "avx512bf16", "bfloat16", linear_trials),
    KernelCheck("linear", "amx", "bfloat16", linear_trials),
    KernelCheck("linear", "onednn", "bfloat16", linear_trials),
    *(KernelCheck("linear", v, fmt, quant_trials) for v in quant.KERNELS for fmt in quant.QTYPES),
    KernelCheck("attention", "avx2", "float32", attention_trials),
    KernelCheck("attention", "avx2", "bfloat16", attention_trials),
    KernelCheck("attention", "avx2", "int8", attention_trials),
    KernelCheck("attention", "avx512bf16", "bfloat16", attention_trials),
    KernelCheck("attention", "avx512vnni", "int8", attention_trials),
)
