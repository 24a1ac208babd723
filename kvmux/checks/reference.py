"""Float64 references of the kernels and the fresh random inputs they are checked on.

The suite (tests/) and the kernel checks and benchmarks (kvmux.checks.kernels, bench/attention.py,
bench/gpu_check.py) all check against these, so a kernel is held to one
standard wherever it runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kvmux.cache.kv_cache import KVCache, PoolGeometry, dequantize_rows, quantize_rows
from kvmux.ops.attention import torch_paged_attention
from kvmux.ops.quant import ACTIVATION_BITS, BLOCK, GGUF_BLOCK_BYTES
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

    def batch(self) -> ForwardBatch:
        """A fresh batch each call, so no backend sees another's per-step metadata."""
        return ForwardBatch.build(self.chunks, self.cache.block_size, self.cache.device)

    def fresh_cache(self) -> KVCache:
        """A copy of the pool as it was before any call."""
        copy = KVCache(self.cache.num_blocks, self.cache.geometry, self.cache.device)
        copy.kv.copy_(self.cache.kv)
        return copy


def make_case(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, kv_dtype: torch.dtype, act_dtype: torch.dtype, seed: int,
              device: str = "cpu", strided_kv: bool = True) -> Case:
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
    if kv_dtype == torch.int8:  # rows of random values and scales, as quantize_rows writes them
        rows = torch.randn(*cache.kv.shape[:-1], head_dim, generator=g)
        cache.kv.copy_(quantize_rows(rows))
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
    return Case(q, k, v, cache, chunks, head_dim ** -0.5)


def reference_f64(case: Case, pool_after: torch.Tensor, bf16_q: bool = False) -> torch.Tensor:
    """Attention in float64 over the pool as the kernel left it (new K/V already in their slots); bf16_q: of
    q * scale rounded to bf16 first, as the bf16 dot-product kernel multiplies it."""
    return _attend_f64(case, pool_after, bf16_q)[0]


def weight_rounding_bound(case: Case, pool_after: torch.Tensor) -> torch.Tensor:
    """What rounding the softmax weights to bf16 (relative error <= 2^-9 each, their sum kept exact) can move
    each output element by: 2^-9 * sum_t p_t |v_t|, per element of reference_f64(case, pool_after, True)."""
    return _attend_f64(case, pool_after, True)[1] * 2.0 ** -9


def _attend_f64(case: Case, pool_after: torch.Tensor, bf16_q: bool) -> tuple[torch.Tensor, torch.Tensor]:
    layer_kv = pool_after[:, LAYER].cpu()  # [NB, 2, Hkv, bs, D], dequantized from an int8 pool's rows
    layer_kv = (dequantize_rows(layer_kv) if layer_kv.dtype == torch.int8 else layer_kv).double()
    # q * scale, in float64 or (as the bf16 kernel takes it) rounded to bf16 from float32.
    q = (case.q.cpu().float() * case.scale).bfloat16().double() if bf16_q else case.q.cpu().double() * case.scale
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // layer_kv.shape[2]
    out, weighted_abs = torch.empty_like(q), torch.empty_like(q)
    start = 0
    for chunk in case.chunks:
        n, ctx = len(chunk.token_ids), chunk.position + len(chunk.token_ids)
        kv = layer_kv[torch.tensor(chunk.block_table)]              # [nb, 2, Hkv, bs, D]
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, kv.shape[2], -1, head_dim)[:, :, :ctx]
        keys = kv[0].repeat_interleave(group, 0)                    # [Hq, ctx, D]
        values = kv[1].repeat_interleave(group, 0)
        qs = q[start:start + n].transpose(0, 1)                     # [Hq, n, D]
        scores = qs @ keys.transpose(1, 2)
        pos = torch.arange(ctx - n, ctx)[:, None]
        weights = scores.masked_fill(torch.arange(ctx)[None, :] > pos, float("-inf")).softmax(-1)
        out[start:start + n] = (weights @ values).transpose(0, 1)
        weighted_abs[start:start + n] = (weights @ values.abs()).transpose(0, 1)
        start += n
    return out, weighted_abs


def expected_pool(case: Case) -> torch.Tensor:
    """The pool after the torch reference wrote this step's K/V (what every backend must leave)."""
    cache = case.fresh_cache()
    torch_paged_attention(case.q, case.k, case.v, cache, LAYER, case.batch(), case.scale)
    return cache.kv


# ---------------------------------------------------------------------------------------------------------------
# Quantized matmuls (kvmux/ops/quant.py, native/cpu/quant_linear.h): GGUF blocks read straight from their bytes,
# independently of the kernels' panel layout, and activations quantized as the kernels quantize them.

def random_gguf_blocks(qtype: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh GGUF blocks of every integer the type can hold (Q8_0's -128 too), uint8 [rows, cols / 32 * bytes]."""
    blocks = cols // BLOCK
    scale = (torch.rand(rows, blocks, 1, generator=generator) * 0.02 + 1e-4).half()
    header = [scale]
    if qtype == "q8_0":
        q = torch.randint(-128, 128, (rows, blocks, BLOCK), generator=generator, dtype=torch.int8).view(torch.uint8)
    else:
        q = torch.randint(0, 256, (rows, blocks, BLOCK // 2), generator=generator, dtype=torch.uint8)
        if qtype == "q4_1":
            header.append((torch.randn(rows, blocks, 1, generator=generator) * 0.05).half())
    raw = torch.cat([h.view(torch.uint8) for h in header] + [q], dim=-1)
    assert raw.shape[-1] == GGUF_BLOCK_BYTES[qtype]
    return raw.reshape(rows, -1)


def gguf_parts_f64(qtype: str, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF blocks uint8 [N, bytes] -> (d q', m) float64 [N, K] with w = d q' + m, decoded from the bytes as
    llama.cpp defines them: q' = q for Q8_0 and Q4_1, q - 8 for Q4_0; m = 0 except for Q4_1."""
    b = raw.reshape(raw.shape[0], -1, GGUF_BLOCK_BYTES[qtype])
    d = b[..., 0:2].contiguous().view(torch.float16).double()                   # [N, blocks, 1]
    m = torch.zeros_like(d)
    if qtype == "q8_0":
        dq = b[..., 2:].contiguous().view(torch.int8).double() * d
    else:
        q = b[..., 4:] if qtype == "q4_1" else b[..., 2:]
        q = torch.cat((q & 15, q >> 4), dim=-1).double()                         # byte j: k = j, j + 16
        if qtype == "q4_1":
            dq, m = q * d, b[..., 2:4].contiguous().view(torch.float16).double()
        else:
            dq = (q - 8) * d
    return dq.reshape(raw.shape[0], -1), m.expand(*dq.shape[:2], 32).reshape(raw.shape[0], -1)


def dequantize_gguf_f64(qtype: str, raw: torch.Tensor) -> torch.Tensor:
    """GGUF blocks uint8 [N, bytes] -> the weight in float64 [N, K]."""
    dq, m = gguf_parts_f64(qtype, raw)
    return dq + m


def quantize_activations_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [M, K] -> (q, d float32 [M, K / 32]) as the kernels quantize: per block of 32, with
    L = 127 (bits 8) or 32767 (bits 16), d = amax / L and q = round-half-even(x * (L / amax)), in float32."""
    levels = 2.0 ** (bits - 1) - 1
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    # A tensor divided by a tensor: `levels / amax` would be amax.reciprocal() * levels, rounded differently.
    inv = torch.where(amax > 0, torch.full_like(amax, levels) / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv[..., None]).reshape(x.shape), amax / levels


def quant_linear_f64(qtype: str, raw: torch.Tensor, x: torch.Tensor,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, magnitude) in float64 with x quantized as the kernels do: y is what they compute bar float32 rounding,
    and magnitude = |x_q| @ (|d q'| + |m|).T, the size of the terms whose rounding they accumulate."""
    dq, m = gguf_parts_f64(qtype, raw)
    q, d = quantize_activations_ref(x, ACTIVATION_BITS[qtype])
    xq = (q.double().reshape(x.shape[0], -1, 32) * d.double()[..., None]).reshape(x.shape)
    y = xq @ (dq + m).T
    return (y if bias is None else y + bias.double()), xq.abs() @ (dq.abs() + m.abs()).T


def activation_rounding_bound(qtype: str, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bound on |y - x W^T| from quantizing x alone: each x is off by at most half its block's step d_x / 2."""
    w = dequantize_gguf_f64(qtype, raw).abs().reshape(raw.shape[0], -1, 32).sum(-1)   # [N, blocks]
    _, d = quantize_activations_ref(x, ACTIVATION_BITS[qtype])
    return (d.double() / 2) @ w.T
