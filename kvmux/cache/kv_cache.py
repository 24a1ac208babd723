"""The KV pool: one block-major tensor shared by every sequence, and the shape of one block.

An int8 pool (`kv_cache_dtype="int8"`) stores each token's K or V of a head as a row of head_dim int8 values and
their float16 scale (x ~ q * scale, scale = max|x| / 127): `quantize_rows` / `dequantize_rows` are the row's
format. A block's (layer, K or V, head) slab of block_size rows keeps their values in the order the int8 kernel
reads them, then their scales: `slab_positions` maps each row byte to its slab byte, and the native kernels write
and read the same bytes (native/cpu/paged_attention.h). The row is of the head's K or V
rotated by `rotate_rows` (an orthonormal Walsh-Hadamard transform, its own inverse), K less the pool's `k_mean`
first where it has one: `store_rows` writes that, `load_rows` reads back V and K - k_mean (attention over K - k_mean
is attention over K: each query's scores move by the same q.k_mean).
"""

from __future__ import annotations

import functools
import math
import mmap
from dataclasses import dataclass

import torch

POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # float16 only where CUDA reads it
INT8_SCALE_BYTES = 2  # an int8 row's float16 scale, after its values


@functools.cache
def slab_positions(which: int, block_size: int, head_dim: int) -> torch.Tensor:
    """long [block_size, head_dim + 2]: the byte of an int8 K (which=0) or V (1) slab that byte j of token t's row
    lands on. K's dwords are 4 head dims of one token, tokens side by side; V's are one head dim of 4 consecutive
    tokens; the tokens' float16 scales follow the values."""
    t, d = torch.arange(block_size)[:, None], torch.arange(head_dim)[None, :]
    values = ((d // 4) * block_size + t) * 4 + d % 4 if which == 0 else ((t // 4) * head_dim + d) * 4 + t % 4
    scales = block_size * head_dim + 2 * t + torch.arange(INT8_SCALE_BYTES)[None, :]
    return torch.cat([values, scales], dim=1)


def to_slabs(rows: torch.Tensor, which: int) -> torch.Tensor:
    """int8 rows [..., block_size, head_dim + 2] of K (which=0) or V (1) -> their slabs [..., block_size * row]."""
    block_size, row = rows.shape[-2:]
    slabs = torch.empty(*rows.shape[:-2], block_size * row, dtype=torch.int8, device=rows.device)
    slabs[..., slab_positions(which, block_size, row - INT8_SCALE_BYTES).flatten().to(rows.device)] = rows.flatten(-2)
    return slabs


def from_slabs(slabs: torch.Tensor, which: int, block_size: int) -> torch.Tensor:
    """int8 K (which=0) or V (1) slabs [..., block_size * row] -> their rows [..., block_size, row]."""
    head_dim = slabs.shape[-1] // block_size - INT8_SCALE_BYTES
    return slabs[..., slab_positions(which, block_size, head_dim).to(slabs.device)]


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> int8 [..., D + 2]: the values q = round(x / scale) and the float16 scale = max|x| / 127 (rounded
    to float16 before q is computed, as the kernels do; a row of zeros gets scale 0)."""
    x = x.float()
    peak = x.abs().amax(-1, keepdim=True)
    # A tensor divisor: torch on CUDA multiplies by 1/127 for a number, one ulp off the kernels' true division.
    scale = (peak / torch.full_like(peak, 127.0)).half()
    inv = torch.where(scale > 0, 1 / scale.float(), torch.zeros((), device=x.device))
    q = torch.round(x * inv).clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """int8 [..., D + 2] -> float32 [..., D]."""
    scale = rows[..., -INT8_SCALE_BYTES:].contiguous().view(torch.float16).float()
    return rows[..., :-INT8_SCALE_BYTES].float() * scale


def hadamard_block(dim: int) -> int:
    """The rotation's block: the largest power of two dividing dim, at most 256 (native/cpu/hadamard.h)."""
    return min(dim & -dim, 256)


def rotate_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., D] -> H x, H the orthonormal Walsh-Hadamard transform in blocks of hadamard_block(D), with the
    kernels' butterflies in their order (so the int8 bytes match theirs exactly); H is its own inverse."""
    dim = x.shape[-1]
    n = hadamard_block(dim)
    y = (x if x.dtype == torch.float64 else x.float()).reshape(*x.shape[:-1], dim // n, n)  # float64 for references
    length = 1
    while length < n:
        pairs = y.reshape(*y.shape[:-1], n // (2 * length), 2, length)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(y.shape)
        length *= 2
    return (y * torch.tensor(1 / math.sqrt(n), dtype=y.dtype, device=x.device)).reshape(x.shape)


def store_rows(x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """K (with its [Hkv, D] mean) or V [..., Hkv, D] -> the int8 pool's rows [..., Hkv, D + 2]."""
    x = x.float()
    return quantize_rows(rotate_rows(x if mean is None else x - mean))


def load_rows(rows: torch.Tensor) -> torch.Tensor:
    """int8 pool rows -> float32 V, or K less the pool's k_mean."""
    return rotate_rows(dequantize_rows(rows))


@dataclass(frozen=True)
class PoolGeometry:
    """The shape of one KV block across all layers: every tier (device, host, disk) stores blocks of it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype = torch.float32

    @property
    def block_shape(self) -> tuple[int, ...]:
        """[layers, K/V, heads, block_size, head_dim]; an int8 pool's (layer, K or V, head) slab is one axis of bytes
        (slab_positions)."""
        if self.dtype == torch.int8:
            return (self.num_layers, 2, self.num_kv_heads, self.block_size * (self.head_dim + INT8_SCALE_BYTES))
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in an anonymous mapping: the OS hands out zero pages as they are first written, so a
    pool sized for many sequences holds memory only for the blocks in use (torch.zeros writes every page)."""
    numel = 1
    for d in shape:
        numel *= d
    buffer = mmap.mmap(-1, max(1, numel * torch.empty((), dtype=dtype).element_size()),
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)  # the tensor keeps the mapping alive


class KVCache:
    """Owns `kv[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]`.

    Block-major so that one block across all layers is a single contiguous
    region: copy-on-write and host swaps are then one copy per block.

    `sliding`: the sliding-window layers' own pool, where a model has one (kvmux/cache/pool_plan.py); this one then
    holds the full-attention layers only, each pool's layers numbered in model order.
    """

    def __init__(self, num_blocks: int, geometry: PoolGeometry, device: torch.device | str = "cpu",
                 sliding: KVCache | None = None) -> None:
        if geometry.dtype not in POOL_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {POOL_DTYPES}, got {geometry.dtype}")
        if num_blocks < 1 or geometry.block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {geometry.block_size}")
        if geometry.dtype == torch.int8 and (geometry.head_dim % 4 or not (geometry.block_size == 8 or
                                                                            geometry.block_size % 16 == 0)):
            # Dwords of 4 head dims or of 4 tokens; the int8 kernel reads keys 16 at a time from one block or two.
            raise ValueError(f"an int8 pool needs head_dim a multiple of 4 and block_size 8 or a multiple of 16, "
                             f"got {geometry.head_dim} and {geometry.block_size}")
        self.geometry = geometry
        # Zeroed, not empty: attention multiplies masked-out slots by a zero
        # weight, and 0 * NaN from uninitialised memory would poison the output.
        shape = (num_blocks, *geometry.block_shape)
        if torch.device(device).type == "cpu":
            self.kv = zeros_on_touch(shape, geometry.dtype)
        else:
            self.kv = torch.zeros(shape, dtype=geometry.dtype, device=device)
        self.sliding = sliding
        # An int8 pool's K offset, [num_layers, num_kv_heads, head_dim] float32 (None: none); see the module
        # docstring. Whatever it is, attention is the same up to rounding: it only has to be the same for every key
        # of a sequence, so it is set before the pool holds any.
        self.k_mean: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.geometry.num_kv_heads

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def head_dim(self) -> int:
        return self.geometry.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device
