"""Python side of the CUDA paged-attention kernels (`kvmux._native_cuda`).

The module is imported lazily, the first time CUDA tensors reach attention, so
CPU-only installs (no nvcc at build time) never need it. As on CPU, tensors are
checked here and cross as addresses; the kernels run on torch's current stream.
"""

from __future__ import annotations

import functools
import importlib

import torch

from kvmux.cache.kv_cache import KVCache
from kvmux.ops.tensor_checks import (
    DTYPE_CODES,
    check_k_mean,
    check_out,
    check_pool,
    check_rows,
    row_stride,
    step_tensors,
)
from kvmux.step.forward_batch import ForwardBatch


@functools.cache
def _module():
    return importlib.import_module("kvmux._native_cuda")


def available() -> bool:
    """Whether the CUDA module was built and a GPU is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        _module()
    except ImportError:
        return False
    return True


class CudaMetadata:
    """Per-step metadata on the device, built at the first layer (it needs the head layout)."""

    def __init__(self, batch: ForwardBatch, kv_cache: KVCache, group: int, head_dim: int) -> None:
        native = _module()
        device = kv_cache.device
        self.slots, self.tables = step_tensors(batch, kv_cache)
        qlens, ctx = batch.query_lens, batch.context_lens
        if any(c < n or n < 1 for n, c in zip(qlens, ctx)):
            raise ValueError("batch: every sequence needs 1 <= query_len <= context_len")
        if max(-(-c // kv_cache.block_size) for c in ctx) > self.tables.shape[1]:
            raise ValueError("batch.block_tables: fewer columns than the longest context needs")
        # A bad index would be an illegal address inside a kernel; one sync per step rules it out.
        bounds = torch.stack([self.tables.min(), self.tables.max(), self.slots.min(), self.slots.max()]).tolist()
        if bounds[0] < 0 or bounds[1] >= kv_cache.num_blocks:
            raise ValueError(f"batch.block_tables: block ids {bounds[:2]} outside the pool of {kv_cache.num_blocks}")
        if bounds[2] < 0 or bounds[3] >= kv_cache.num_blocks * kv_cache.block_size:
            raise ValueError(f"batch.slot_mapping: slots {bounds[2:]} outside the pool")
        starts, total = [], 0
        for n in qlens:
            starts.append(total)
            total += n
        decode = [i for i, n in enumerate(qlens) if n == 1]
        tile = native.prefill_tile_tokens(group)
        tiles = [x for i, n in enumerate(qlens) if n > 1 for b in range(0, n, tile) for x in (i, b, min(n, b + tile))]
        # Longest decode context first decides how many partitions the grid needs (a sliding-window layer needs
        # fewer; the grid's other CTAs return at once).
        self.max_partitions = max((-(-ctx[i] // native.PARTITION) for i in decode), default=1)

        S = len(qlens)
        host = torch.tensor(starts + list(qlens) + list(ctx) + decode + tiles, dtype=torch.int32)
        meta = host.to(device, non_blocking=False)
        self.query_starts, self.query_lens, self.context_lens = meta[:S], meta[S:2 * S], meta[2 * S:3 * S]
        self.decode_seqs = meta[3 * S:3 * S + len(decode)]
        self.tiles = meta[3 * S + len(decode):]
        self.num_decode, self.num_tiles = len(decode), len(tiles) // 3
        self.group, self.head_dim = group, head_dim
        # Split-context scratch, shared by all layers (kernels run in stream order).
        shape = (max(self.num_decode, 1), kv_cache.num_kv_heads, self.max_partitions, group)
        big = self.max_partitions > 1
        self.part_out = torch.empty((*shape, head_dim) if big else (1,), dtype=torch.float32, device=device)
        self.part_max = torch.empty(shape if big else (1,), dtype=torch.float32, device=device)
        self.part_sum = torch.empty(shape if big else (1,), dtype=torch.float32, device=device)


def cuda_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                         layer: int, batch: ForwardBatch, scale: float,
                         out: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Fused CUDA kernels: write k, v into their slots, attend q; same contract as `paged_attention`."""
    if q.dim() != 3:
        raise ValueError(f"q: expected [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    if q.device.type != "cuda":
        raise ValueError(f"q: on {q.device}, the CUDA kernels need cuda tensors")
    if q.dtype not in DTYPE_CODES or kv_cache.dtype not in DTYPE_CODES:
        raise ValueError(f"q / kv_cache: dtypes {q.dtype} / {kv_cache.dtype} unsupported")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.num_kv_heads  # the pool is the authority; k and v must match it
    if num_heads % num_kv_heads:
        raise ValueError(f"q: {num_heads} heads is not a multiple of {num_kv_heads} KV heads")
    if head_dim % 8:
        raise ValueError(f"q: head_dim {head_dim} must be a multiple of 8 for the CUDA kernels")
    meta = batch.attn_metadata
    if not isinstance(meta, CudaMetadata):
        meta = batch.attn_metadata = CudaMetadata(batch, kv_cache, num_heads // num_kv_heads, head_dim)
    check_rows("q", q, batch.num_tokens, num_heads, head_dim, q.dtype, kv_cache.device)
    check_rows("k", k, num_tokens, num_kv_heads, head_dim, q.dtype, q.device)
    check_rows("v", v, num_tokens, num_kv_heads, head_dim, q.dtype, q.device)
    check_pool(kv_cache, num_kv_heads, head_dim, layer)
    mean = check_k_mean(kv_cache, layer)

    out = check_out(out, q)
    _module().paged_attention(
        q.data_ptr(), row_stride(q), k.data_ptr(), row_stride(k), v.data_ptr(), row_stride(v), out.data_ptr(),
        DTYPE_CODES[q.dtype], kv_cache.kv.data_ptr(), DTYPE_CODES[kv_cache.dtype],
        0 if mean is None else mean[layer].data_ptr(), kv_cache.num_layers, layer,
        kv_cache.block_size, meta.tables.shape[1], num_tokens, num_heads, num_kv_heads, head_dim, float(scale), window,
        meta.slots.data_ptr(), meta.query_starts.data_ptr(), meta.query_lens.data_ptr(),
        meta.context_lens.data_ptr(), meta.tables.data_ptr(), meta.decode_seqs.data_ptr(), meta.num_decode,
        meta.max_partitions, meta.tiles.data_ptr(), meta.num_tiles, meta.part_out.data_ptr(),
        meta.part_max.data_ptr(), meta.part_sum.data_ptr(), torch.cuda.current_stream(q.device).cuda_stream)
    return out
