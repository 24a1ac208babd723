"""Python side of the native paged-attention kernels (CPU: `kvmux._native`).

The extension takes addresses and sizes, never tensors, so every check on a
tensor (device, dtype, layout, shape) happens here and raises a ValueError
naming the argument. Checks on the step's metadata run once per step, when the
plan is built; the per-layer call checks only what changes between layers.
"""

from __future__ import annotations

import torch

from kvmux import _native
from kvmux.model.forward_batch import ForwardBatch
from kvmux.cache.kv_cache import KVCache

# Must match kvmux::DType in native/paged_attention.h.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def check_rows(name: str, t: torch.Tensor, rows: int, heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device) -> None:
    """`t` must be [rows, heads, head_dim] with contiguous heads; rows may be strided (a column slice)."""
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if t.shape != (rows, heads, head_dim):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {(rows, heads, head_dim)}")
    # Strides of size-1 dimensions are meaningless in torch, so they are not checked.
    if (head_dim > 1 and t.stride(2) != 1) or (heads > 1 and t.stride(1) != head_dim) \
            or (rows > 1 and t.stride(0) < heads * head_dim):
        raise ValueError(f"{name}: heads and head_dim must be contiguous, got strides {t.stride()}")


def check_pool(kv_cache: KVCache, num_kv_heads: int, head_dim: int, layer: int) -> None:
    kv = kv_cache.kv
    if not kv.is_contiguous():
        raise ValueError("kv_cache: pool tensor must be contiguous")
    if kv_cache.num_kv_heads != num_kv_heads or kv_cache.head_dim != head_dim:
        raise ValueError(f"kv_cache: holds {kv_cache.num_kv_heads} KV heads of {kv_cache.head_dim}, "
                         f"k/v have {num_kv_heads} of {head_dim}")
    if not 0 <= layer < kv_cache.num_layers:
        raise ValueError(f"layer: {layer} outside [0, {kv_cache.num_layers})")


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """A fresh output like q, or the caller's buffer (which every call overwrites in full)."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out: need a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    return out


def step_tensors(batch: ForwardBatch, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_mapping (int64) and block_tables (int32), checked and made contiguous on the pool's device."""
    device = kv_cache.device
    slots, tables = batch.slot_mapping, batch.block_tables
    if slots.device != device or tables.device != device:
        raise ValueError(f"batch: metadata on {slots.device}/{tables.device}, KV pool on {device}")
    if slots.dtype != torch.int64 or slots.shape != (batch.num_tokens,):
        raise ValueError(f"batch.slot_mapping: need int64 [{batch.num_tokens}], got {slots.dtype} {tuple(slots.shape)}")
    if tables.dtype != torch.int32 or tables.dim() != 2 or tables.shape[0] != len(batch.query_lens):
        raise ValueError(f"batch.block_tables: need int32 [{len(batch.query_lens)}, max_blocks], "
                         f"got {tables.dtype} {tuple(tables.shape)}")
    return slots.contiguous(), tables.contiguous()


def row_stride(t: torch.Tensor) -> int:
    """Elements between tokens; a single row's stride is arbitrary in torch, so use the dense one."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1] * t.shape[2]


class CpuPlan:
    """Per-step metadata of the CPU kernels (lives in batch.attn_metadata)."""

    def __init__(self, batch: ForwardBatch, kv_cache: KVCache) -> None:
        slots, tables = step_tensors(batch, kv_cache)
        self.plan = _native.AttentionPlan(
            slots.data_ptr(), batch.num_tokens, batch.query_lens, batch.context_lens,
            tables.data_ptr(), tables.shape[1], kv_cache.block_size, kv_cache.num_blocks)
        # Read once per step: torch's intra-op thread count is the engine's `threads` setting.
        self.num_threads = torch.get_num_threads()


def cpu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                        layer: int, batch: ForwardBatch, scale: float,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused CPU kernel: write k, v into their slots, attend q; same contract as `paged_attention`."""
    meta = batch.attn_metadata
    if not isinstance(meta, CpuPlan):
        meta = batch.attn_metadata = CpuPlan(batch, kv_cache)
    if q.dim() != 3:
        raise ValueError(f"q: expected [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.num_kv_heads  # the pool is the authority; k and v must match it
    if q.dtype not in DTYPE_CODES:
        raise ValueError(f"q: dtype {q.dtype} unsupported; use float32 or bfloat16")
    if q.device.type != "cpu":
        raise ValueError(f"q: on {q.device}, the CPU kernels need cpu tensors")
    check_rows("q", q, meta.plan.num_tokens, num_heads, head_dim, q.dtype, kv_cache.device)
    check_rows("k", k, num_tokens, num_kv_heads, head_dim, q.dtype, q.device)
    check_rows("v", v, num_tokens, num_kv_heads, head_dim, q.dtype, q.device)
    if num_heads % num_kv_heads:
        raise ValueError(f"q: {num_heads} heads is not a multiple of {num_kv_heads} KV heads")
    check_pool(kv_cache, num_kv_heads, head_dim, layer)

    out = check_out(out, q)
    meta.plan.run(q.data_ptr(), row_stride(q), k.data_ptr(), row_stride(k), v.data_ptr(), row_stride(v),
                  out.data_ptr(), DTYPE_CODES[q.dtype], kv_cache.kv.data_ptr(), DTYPE_CODES[kv_cache.dtype],
                  kv_cache.num_blocks, kv_cache.num_layers, kv_cache.block_size, layer,
                  num_heads, num_kv_heads, head_dim, float(scale), meta.num_threads)
    return out
