"""Python side of the CPU paged-attention kernels (`kvmux._native`).

Checks on the step's metadata run once per step, when the metadata is built;
the per-layer call checks only what changes between layers.
"""

from __future__ import annotations

import torch

from kvmux import _native
from kvmux.cache.kv_cache import KVCache
from kvmux.ops import kernel_choice
from kvmux.ops.tensor_checks import (
    DTYPE_CODES,
    check_k_mean,
    check_out,
    check_pool,
    check_rows,
    row_stride,
    step_tensors,
)
from kvmux.ops.threads import threads
from kvmux.step.forward_batch import ForwardBatch

ATTENTION_KERNELS = {"avx2": _native.AttentionKernel.avx2, "avx512bf16": _native.AttentionKernel.avx512bf16,
                     "avx512vnni": _native.AttentionKernel.avx512vnni}


def attention_variant(kv_dtype: torch.dtype, head_dim: int) -> str:
    """The kernel for a pool of kv_dtype: the one KVMUX_KERNELS forces, else the fastest this CPU runs for it.

    Unlike a matmul's, the choice does not depend on the step's shape: on SmolLM2's shapes the bf16
    dot-product kernel measured faster than the float32 one from one decode token to whole prefill chunks
    (`python -m bench.attention`), so VARIANTS lists attention's slowest first and the last that runs is taken.
    """
    fmt = str(kv_dtype).removeprefix("torch.")
    runs = [v for v in kernel_choice.candidates("attention", fmt)
            if _native.attention_kernel_supported(ATTENTION_KERNELS[v.name], _native.DType(DTYPE_CODES[kv_dtype]),
                                                  head_dim)]
    if not runs:
        raise ValueError(f"{kernel_choice.ENV}: attention kernel {kernel_choice.forced('attention')!r} "
                         f"does not take head_dim {head_dim} (its bf16 path takes 64, 128 or 256)")
    return runs[-1].name


class CpuMetadata:
    """Per-step metadata of the CPU kernels (lives in batch.attn_metadata)."""

    def __init__(self, batch: ForwardBatch, kv_cache: KVCache, variant: str | None = None) -> None:
        """variant: the attention kernel to use (kernel_choice names); None: attention_variant's choice."""
        slots, tables = step_tensors(batch, kv_cache)
        self.native = _native.AttentionMetadata(
            slots.data_ptr(), batch.num_tokens, batch.query_lens, batch.context_lens,
            tables.data_ptr(), tables.shape[1], kv_cache.block_size, kv_cache.num_blocks)
        # Read once per step: the engine's `threads` setting (kvmux/ops/threads.py).
        self.num_threads = threads()
        self.kernel = ATTENTION_KERNELS[variant or attention_variant(kv_cache.dtype, kv_cache.head_dim)]


def cpu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                        layer: int, batch: ForwardBatch, scale: float,
                        out: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Fused CPU kernel: write k, v into their slots, attend q; same contract as `paged_attention`."""
    meta = batch.attn_metadata
    if not isinstance(meta, CpuMetadata):
        meta = batch.attn_metadata = CpuMetadata(batch, kv_cache)
    if q.dim() != 3:
        raise ValueError(f"q: expected [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.num_kv_heads  # the pool is the authority; k and v must match it
    if q.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"q: dtype {q.dtype} unsupported; use float32 or bfloat16")
    if q.device.type != "cpu":
        raise ValueError(f"q: on {q.device}, the CPU kernels need cpu tensors")
    check_rows("q", q, meta.native.num_tokens, num_heads, head_dim, q.dtype, kv_cache.device)
    check_rows("k", k, num_tokens, num_kv_heads, head_dim, q.dtype, q.device)
    check_rows("v", v, num_tokens, num_kv_heads, head_dim, q.dtype, q.device)
    if num_heads % num_kv_heads:
        raise ValueError(f"q: {num_heads} heads is not a multiple of {num_kv_heads} KV heads")
    check_pool(kv_cache, num_kv_heads, head_dim, layer)

    out = check_out(out, q)
    mean = check_k_mean(kv_cache, layer)
    k_mean = 0 if mean is None else mean[layer].data_ptr()
    meta.native.run(q.data_ptr(), row_stride(q), k.data_ptr(), row_stride(k), v.data_ptr(), row_stride(v),
                  out.data_ptr(), DTYPE_CODES[q.dtype], kv_cache.kv.data_ptr(), DTYPE_CODES[kv_cache.dtype],
                  kv_cache.num_blocks, kv_cache.num_layers, kv_cache.block_size, layer,
                  num_heads, num_kv_heads, head_dim, float(scale), meta.num_threads, meta.kernel, window, k_mean)
    return out
