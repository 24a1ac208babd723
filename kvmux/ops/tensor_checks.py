"""The checks every kernel wrapper makes before it passes tensors to native code as addresses.

The extension modules take addresses and sizes, never tensors, so a tensor's
device, dtype, layout and shape are checked here and a bad one raises a
ValueError naming the argument.
"""

from __future__ import annotations

import torch

from kvmux import _native
from kvmux.cache.kv_cache import KVCache

# What every kernel is told its tensors hold (kvmux::DType in native/dtype.h).
DTYPE_CODES = {torch.float32: int(_native.DType.f32), torch.bfloat16: int(_native.DType.bf16),
               torch.float16: int(_native.DType.f16), torch.int8: int(_native.DType.i8)}


def linear_bias(op: str, bias: torch.Tensor | None, out_features: int) -> torch.Tensor | None:
    """A CPU matmul kernel's bias: float32 [out_features] contiguous, or None."""
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,) or bias.device.type != "cpu"):
        raise ValueError(f"{op}: bias {bias.dtype} {tuple(bias.shape)}, expected float32 ({out_features},)")
    return None if bias is None else bias.contiguous()  # the caller holds it while the kernel reads its address


def linear_input(op: str, x: torch.Tensor, in_features: int, out_features: int,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a CPU matmul kernel is handed on each call: x float32 [rows, in_features] with unit column stride
    (copied if not), and the float32 [rows, out_features] output to fill: `out` where given (it must be that,
    contiguous), else a new one."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"{op}: need x float32 [rows, {in_features}] on the CPU, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        return x, torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if out.dtype != torch.float32 or out.device.type != "cpu" or out.shape != (x.shape[0], out_features) \
            or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous float32 [{x.shape[0]}, {out_features}] CPU tensor, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return x, out


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


def check_k_mean(kv_cache: KVCache, last_layer: int) -> torch.Tensor | None:
    """An int8 pool's K offsets (None where it has none), checked to hold layers 0 .. last_layer as the kernels
    read them: by address, [layers, num_kv_heads, head_dim] float32 contiguous, on the pool's device."""
    mean = kv_cache.k_mean if kv_cache.dtype == torch.int8 else None
    shape = (kv_cache.num_kv_heads, kv_cache.head_dim)
    if mean is not None and (mean.dtype != torch.float32 or not mean.is_contiguous() or mean.dim() != 3
                             or mean.shape[0] <= last_layer or tuple(mean.shape[1:]) != shape
                             or mean.device != kv_cache.device):
        raise ValueError(f"kv_cache.k_mean: expected float32 [{last_layer + 1} layers or more, {shape[0]}, "
                         f"{shape[1]}], contiguous, on {kv_cache.device}, got {mean.dtype} {tuple(mean.shape)} "
                         f"on {mean.device}")
    return mean


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """A fresh output like q, or the caller's buffer (which every call overwrites in full)."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out: need a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    return out


def step_tensors(batch, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
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
