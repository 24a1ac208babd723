"""Float64 references of the kernels and the fresh random inputs they are checked on.

The suite (tests/) and the kernel checks and benchmarks (kvmux.checks.kernels, bench/attention.py,
bench/gpu_check.py) all check against these, so a kernel is held to one
standard wherever it runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmux.cache.kv_cache import (
    INT8_SCALE_BYTES,
    KVCache,
    PoolGeometry,
    dequantize_rows,
    from_slabs,
    hadamard_block,
    quantize_rows,
    rotate_rows,
    to_slabs,
)
from kvmux.ops.attention import torch_paged_attention
from kvmux.ops.gguf_blocks import FORM_OF, GGUF_BLOCK, OFFSET, decode
from kvmux.ops.quant import ACTIVATION_BITS, BLOCKS
from kvmux.step.forward_batch import ForwardBatch
from kvmux.step.work import Chunk

NUM_LAYERS = 2
LAYER = 1  # not layer 0, so a wrong layer offset shows


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache: KVCache
    chunks: list[Chunk]
    scale: float
    window: int = 0  # > 0: a sliding-window layer's, each query seeing its last `window` keys

    def batch(self) -> ForwardBatch:
        """A fresh batch each call, so no backend sees another's per-step metadata."""
        return ForwardBatch.build(self.chunks, self.cache.block_size, self.cache.device)

    def fresh_cache(self) -> KVCache:
        """A copy of the pool as it was before any call."""
        copy = KVCache(self.cache.num_blocks, self.cache.geometry, self.cache.device)
        copy.kv.copy_(self.cache.kv)
        copy.k_mean = self.cache.k_mean
        return copy


def make_case(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, kv_dtype: torch.dtype, act_dtype: torch.dtype, seed: int,
              device: str = "cpu", strided_kv: bool = True, window: int = 0) -> Case:
    """Sequences with query_lens new tokens ending at context_lens, blocks shuffled across the pool.

    With strided_kv, k and v are column slices of one fused projection, as the model passes them.
    """
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need) + 3  # a few blocks no sequence owns
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    chunks = []
    for n, c, nb in zip(query_lens, context_lens, need):
        chunks.append(Chunk(f"s{len(chunks)}", c - n, [0] * n, blocks[:nb]))
        blocks = blocks[nb:]
    cache = KVCache(num_blocks, PoolGeometry(NUM_LAYERS, num_kv_heads, head_dim, block_size, kv_dtype), device)
    if kv_dtype == torch.int8:  # rows of random values and scales, as quantize_rows writes them, in their slabs
        rows = quantize_rows(torch.randn(*cache.kv.shape[:-1], block_size, head_dim, generator=g))
        for which in (0, 1):
            cache.kv[:, :, which] = to_slabs(rows[:, :, which], which)
    else:
        cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    T = sum(query_lens)
    q = torch.randn(T, num_heads, head_dim, generator=g).to(act_dtype).to(device)
    if strided_kv:
        fused = torch.randn(T, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(act_dtype).to(device)
        k, v = fused[:, num_heads:num_heads + num_kv_heads], fused[:, num_heads + num_kv_heads:]
    else:
        k = torch.randn(T, num_kv_heads, head_dim, generator=g).to(act_dtype).to(device)
        v = torch.randn(T, num_kv_heads, head_dim, generator=g).to(act_dtype).to(device)
    return Case(q, k, v, cache, chunks, head_dim ** -0.5, window)


Q_ROUNDINGS = ("none", "bf16", "int16")
INT8_CHUNK = 32  # keys per chunk of the int8 kernel, whose softmax weights share a scale (paged_attention_i8.h)


def reference_f64(case: Case, pool_after: torch.Tensor, q_rounding: str = "none") -> torch.Tensor:
    """Attention in float64 over the pool as the kernel left it (new K/V already in their slots), of q * scale
    as a kernel multiplies it (q_rounding): exact; rounded to bf16 from float32 (the bf16 dot-product kernel); or,
    rotated, quantized to 16 bits per row in float32 (the int8 dot-product kernel)."""
    return _attend_f64(case, pool_after, q_rounding)[0]


def weight_rounding_bound(case: Case, pool_after: torch.Tensor) -> torch.Tensor:
    """What rounding the softmax weights to bf16 (relative error <= 2^-9 each, their sum kept exact) can move
    each output element by: 2^-9 * sum_t p_t |v_t|, per element of reference_f64(case, pool_after, "bf16")."""
    return _attend_f64(case, pool_after, "bf16")[1] * 2.0 ** -9


def u8_weight_bound(case: Case, pool_after: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel's rounding of each chunk's softmax weights times their V scales to 8 bits (half a step
    at most, the chunk's largest / 510) can move each output element by: the sum over chunks of that half step
    times sum |v| of the chunk's int8 values, per element of reference_f64(case, pool_after, "int16")."""
    return _attend_f64(case, pool_after, "int16")[2]


def _rotated_bound(bound: torch.Tensor) -> torch.Tensor:
    """A bound b on a rotated output's elements as a bound on the output's: H's rows have entries +-1 / sqrt(n)
    over their block, so each element is bounded by sum(b over its block) / sqrt(n)."""
    head_dim = bound.shape[-1]
    n = hadamard_block(head_dim)
    blocks = bound.reshape(*bound.shape[:-1], head_dim // n, n)
    return (blocks.sum(-1, keepdim=True) / n ** 0.5).expand(blocks.shape).reshape(bound.shape)


def int16_q(q: torch.Tensor) -> torch.Tensor:
    """float32 rows [..., D] -> float64 rows as the int8 kernel quantizes them: scale = max |x| / 32767, values
    round-half-even(x * (32767 / max |x|)), in float32."""
    peak = q.abs().amax(-1, keepdim=True)
    inv = torch.where(peak > 0, torch.full_like(peak, 32767.0) / peak, torch.zeros_like(peak))
    return torch.round(q * inv).double() * (peak / 32767).double()


def _attend_f64(case: Case, pool_after: torch.Tensor,
                q_rounding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q_rounding not in Q_ROUNDINGS:
        raise ValueError(f"q_rounding must be one of {Q_ROUNDINGS}, got {q_rounding!r}")
    layer_kv = pool_after[:, LAYER].cpu()  # [NB, 2, Hkv, bs, D], dequantized from an int8 pool's slabs
    # An int8 pool's rows are rotated (kv_cache.py): attended in that basis, as the kernels do, with q rotated (in
    # float32, before any rounding) and the output rotated back in float64.
    rotated = layer_kv.dtype == torch.int8
    value_ints = value_scales = None
    if rotated:
        rows = torch.stack([from_slabs(layer_kv[:, w], w, case.cache.block_size) for w in (0, 1)], 1)
        value_ints = rows[:, 1, ..., :-INT8_SCALE_BYTES].double()                    # [NB, Hkv, bs, D]
        value_scales = rows[:, 1, ..., -INT8_SCALE_BYTES:].contiguous().view(torch.float16).double()  # [.., 1]
        layer_kv = dequantize_rows(rows)
    layer_kv = layer_kv.double()
    if q_rounding == "none":
        q = case.q.cpu().double() * case.scale
        q = rotate_rows(q) if rotated else q
    else:
        q = case.q.cpu().float() * case.scale
        q = rotate_rows(q) if rotated else q
        q = q.bfloat16().double() if q_rounding == "bf16" else int16_q(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // layer_kv.shape[2]
    out, weighted_abs, u8_bound = torch.empty_like(q), torch.empty_like(q), torch.zeros_like(q)
    start = 0
    for chunk in case.chunks:
        n, ctx = len(chunk.token_ids), chunk.position + len(chunk.token_ids)
        kv = layer_kv[torch.tensor(chunk.block_table)]              # [nb, 2, Hkv, bs, D]
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, kv.shape[2], -1, head_dim)[:, :, :ctx]
        keys = kv[0].repeat_interleave(group, 0)                    # [Hq, ctx, D]
        values = kv[1].repeat_interleave(group, 0)
        qs = q[start:start + n].transpose(0, 1)                     # [Hq, n, D]
        scores = qs @ keys.transpose(1, 2)
        pos, keys_at = torch.arange(ctx - n, ctx)[:, None], torch.arange(ctx)[None, :]
        unseen = (keys_at > pos) | ((keys_at <= pos - case.window) if case.window else False)
        weights = scores.masked_fill(unseen, float("-inf")).softmax(-1)
        out[start:start + n] = (weights @ values).transpose(0, 1)
        weighted_abs[start:start + n] = (weights @ values.abs()).transpose(0, 1)
        if rotated:
            table = torch.tensor(chunk.block_table)
            ints = value_ints[table].transpose(0, 1).reshape(value_ints.shape[1], -1, head_dim)[:, :ctx]
            scales = value_scales[table].transpose(0, 1).reshape(value_ints.shape[1], -1)[:, :ctx]
            pad = -ctx % INT8_CHUNK
            w = F.pad(weights * scales.repeat_interleave(group, 0)[:, None, :], (0, pad))  # [Hq, n, ctx + pad]
            half_step = w.reshape(*w.shape[:2], -1, INT8_CHUNK).amax(-1) / 510                # [Hq, n, chunks]
            sums = F.pad(ints.abs(), (0, 0, 0, pad)).reshape(ints.shape[0], -1, INT8_CHUNK, head_dim).sum(2)
            u8_bound[start:start + n] = (half_step @ sums.repeat_interleave(group, 0)).transpose(0, 1)
        start += n
    if rotated:
        weighted_abs, u8_bound = _rotated_bound(weighted_abs), _rotated_bound(u8_bound)
        out = rotate_rows(out)
    return out, weighted_abs, u8_bound


def expected_pool(case: Case) -> torch.Tensor:
    """The pool after the torch reference wrote this step's K/V (what every backend must leave)."""
    cache = case.fresh_cache()
    torch_paged_attention(case.q, case.k, case.v, cache, LAYER, case.batch(), case.scale)
    return cache.kv


# ---------------------------------------------------------------------------------------------------------------
# Quantized matmuls (kvmux/ops/quant.py, native/cpu/quant_linear.h): GGUF blocks decoded into their form's numbers
# (kvmux/ops/gguf_blocks.py, itself checked against the gguf package), independently of the kernels' panel
# layout, and activations quantized as the kernels quantize them.

# Where each type's fp16 scales sit in its block: (byte offset, magnitude), and its signed offset's (Q4_1, Q5_1).
_SCALES = {"Q4_K": [(0, 0.02 / 63), (2, 0.01 / 63)], "Q5_K": [(0, 0.02 / 63), (2, 0.01 / 63)],
           "Q6_K": [(208, 0.02 / 127)]}
_OFFSETS = {"Q4_1": 2, "Q5_1": 2}


def random_gguf_blocks(gguf_type: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh GGUF blocks of the type, uint8 [rows, cols / values per block * bytes]: random integers (every value
    the type can hold) and sub-block scales, with fp16 scales of a realistic size."""
    t = gguf_type.upper()
    block_bytes, values = GGUF_BLOCK[t]
    blocks = cols // values
    raw = torch.randint(0, 256, (rows, blocks, block_bytes), generator=generator, dtype=torch.uint8)
    for at, size in _SCALES.get(t, [(0, 0.02)]):
        scale = (torch.rand(rows, blocks, 1, generator=generator) * size + size / 200).half()
        raw[..., at:at + 2] = scale.view(torch.uint8)
    if t in _OFFSETS:
        at = _OFFSETS[t]
        raw[..., at:at + 2] = (torch.randn(rows, blocks, 1, generator=generator) * 0.05).half().view(torch.uint8)
    return raw.reshape(rows, -1)


def gguf_parts_f64(gguf_type: str, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF blocks uint8 [N, bytes] -> (d (q - off), m) float64 [N, K] with w = d (q - off) + m, in the numbers
    the kernels keep (a K-quant's sub-block scales as fp16 products)."""
    rows = decode(gguf_type.upper(), raw)
    size = BLOCKS[rows.form]
    q = rows.q.view(torch.int8) if rows.form == "q8_0" else rows.q
    d = rows.d.double().repeat_interleave(size, 1)
    dq = (q.double() - OFFSET.get(rows.form, 0)) * d
    m = torch.zeros_like(dq) if rows.m is None else rows.m.double().repeat_interleave(size, 1)
    return dq, m


def dequantize_gguf_f64(gguf_type: str, raw: torch.Tensor) -> torch.Tensor:
    """GGUF blocks uint8 [N, bytes] -> the weight in float64 [N, K] (as the kernels keep it)."""
    dq, m = gguf_parts_f64(gguf_type, raw)
    return dq + m


def quantize_activations_ref(x: torch.Tensor, bits: int, block: int = 32,
                             span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [M, K] -> (q, d float32 [M, K / block]) as the kernels quantize: per block of 32 (16 for Q6_K),
    with L = 127 (bits 8) or 32767 (bits 16), d = amax / L and q = round-half-even(x * (L / amax)), in float32,
    amax taken over each span of `span` values (None: the block), so d repeats within a span."""
    levels = 2.0 ** (bits - 1) - 1
    spans = x.float().reshape(x.shape[0], -1, span or block)
    amax = spans.abs().amax(-1)
    # A tensor divided by a tensor: `levels / amax` would be amax.reciprocal() * levels, rounded differently.
    inv = torch.where(amax > 0, torch.full_like(amax, levels) / amax, torch.zeros_like(amax))
    d = (amax / levels).repeat_interleave((span or block) // block, 1)
    return torch.round(spans * inv[..., None]).reshape(x.shape), d


def _activations(gguf_type: str, x: torch.Tensor, span: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    form = FORM_OF[gguf_type.upper()]
    q, d = quantize_activations_ref(x, ACTIVATION_BITS[form], BLOCKS[form], span)
    return q, d, BLOCKS[form]


def quant_linear_f64(gguf_type: str, raw: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
                     span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, magnitude) in float64 with x quantized as the kernels do (under one scale a span of `span` values, as
    QuantWeight.span says; None: the block): y is what they compute bar float32 rounding, and
    magnitude = |x_q| @ (|d q'| + |m|).T, the size of the terms whose rounding they accumulate."""
    dq, m = gguf_parts_f64(gguf_type, raw)
    q, d, size = _activations(gguf_type, x, span)
    xq = (q.double().reshape(x.shape[0], -1, size) * d.double()[..., None]).reshape(x.shape)
    y = xq @ (dq + m).T
    return (y if bias is None else y + bias.double()), xq.abs() @ (dq.abs() + m.abs()).T


def activation_rounding_bound(gguf_type: str, raw: torch.Tensor, x: torch.Tensor,
                              span: int | None = None) -> torch.Tensor:
    """Bound on |y - x W^T| from quantizing x alone: each x is off by at most half its block's step d_x / 2."""
    _, d, size = _activations(gguf_type, x, span)
    w = dequantize_gguf_f64(gguf_type, raw).abs().reshape(raw.shape[0], -1, size).sum(-1)   # [N, blocks]
    return (d.double() / 2) @ w.T


def quant_linear_bf16_f64(gguf_type: str, raw: torch.Tensor, x: torch.Tensor,
                          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, magnitude) in float64 as the bf16 variants compute it (quant.BF16_KERNELS): x rounded to bf16, each
    weight d (q - off) + m rounded to float32 (one fused multiply-add) and then to bf16; magnitude = |x_r| @ |w_r|.T."""
    xr = x.bfloat16().double()
    w = dequantize_gguf_f64(gguf_type, raw).float().bfloat16().double()
    y = xr @ w.T
    return (y if bias is None else y + bias.double()), xr.abs() @ w.abs().T


def bf16_rounding_bound(gguf_type: str, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bound on |y - x W^T| from rounding x and W to bf16: each within 2^-9 of itself, a product within 2^-8."""
    return 2.0 ** -8 * (x.double().abs() @ dequantize_gguf_f64(gguf_type, raw).abs().T)
