"""Weights kept in GGUF's Q8_0, Q4_0 and Q4_1 blocks, multiplied by the native int8 kernels.

A GGUF row is a run of blocks of 32 values: an fp16 scale d (Q4_1 also an
fp16 offset m) and 32 integers; Q8_0 w = d q (q int8), Q4_0 w = d (q - 8),
Q4_1 w = d q + m (q in 0..15). `pack_blocks` keeps exactly those numbers,
rearranged once into panels of 16 rows whose integers interleave along K
(native/cpu/quant_linear.h), so the memory is the file's: 34, 18 or 20 bytes
per 32 weights instead of 128 in float32. `quant_linear` quantizes the
activations per block of 32 on the fly, to int8 for Q4 weights (as llama.cpp
does) and to int16 for Q8_0 (whose accuracy byte activations would spoil),
and runs integer dot products (vpdpbusd / vpdpwssd with VNNI, vpmaddubsw /
vpmaddwd on plain AVX2) with one float multiply-add per block. `QuantWeight.rows` dequantizes single rows (embedding
lookups), so a quantized embedding is also the tied LM head.

The kernel variants (avx2, avxvnni, avx512vnni) are kernel_choice's linear
variants for these formats: the model times them per shape at load like the
float kernels (kvmux/ops/linear.py), and KVMUX_KERNELS=linear=avx2 forces one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvmux import _native
from kvmux.ops import kernel_choice
from kvmux.ops.tensor_checks import linear_bias, linear_input
from kvmux.ops.threads import threads

BLOCK = _native.QUANT_BLOCK  # values per block, along K
PANEL = _native.QUANT_PANEL  # rows per panel
QTYPES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}  # the native QuantType
ACTIVATION_BITS = {"q8_0": 16, "q4_0": 8, "q4_1": 8}  # what the activations are quantized to, per weight type
# Bytes of one GGUF block (its header, then the integers), and of one panel's integers for one block.
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
PANEL_BLOCK_BYTES = {"q8_0": PANEL * BLOCK, "q4_0": PANEL * BLOCK // 2, "q4_1": PANEL * BLOCK // 2}
# kernel_choice's linear variants for these formats -> the native QuantKernel.
KERNELS = {"avx2": 0, "avxvnni": 1, "avx512vnni": 2}
PACK_PANELS = 256  # panels packed at a time, so packing a large tensor needs little scratch memory


@functools.cache
def runnable_kernels() -> frozenset[str]:
    """The variants this CPU runs (checked once: quant_linear runs per matmul)."""
    return frozenset(v.name for v in kernel_choice.runnable("linear", "q8_0"))


@dataclass(eq=False, frozen=True)  # frozen: QuantLinear holds its tensors' addresses
class QuantWeight:
    """A [out_features, in_features] weight in quantized panels (see the module docstring)."""

    qtype: str
    out_features: int
    in_features: int
    quants: torch.Tensor        # uint8 [panels, blocks, PANEL_BLOCK_BYTES]
    scales: torch.Tensor        # float16 [panels, blocks, PANEL]
    mins: torch.Tensor | None   # float16 [panels, blocks, PANEL], Q4_1 only

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.quants, self.scales, self.mins) if t is not None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized to float32 [len(ids), in_features] (an embedding lookup)."""
        panel, col = ids // PANEL, ids % PANEL
        blocks = self.quants.shape[1]
        d = self.scales[panel, :, col].float()[..., None]                      # [T, blocks, 1]
        if self.qtype == "q8_0":
            q = self.quants.view(torch.int8).view(-1, blocks, 16, PANEL, 2)[panel, :, :, col, :]
            return (q.reshape(len(ids), blocks, BLOCK).float() * d).reshape(len(ids), -1)
        b = self.quants.view(-1, blocks, 4, PANEL, 4)[panel, :, :, col, :]     # [T, blocks, 4, 4]
        q = torch.stack((b & 15, b >> 4), dim=-2).reshape(len(ids), blocks, BLOCK).float()
        w = (q - 8) * d if self.qtype == "q4_0" else q * d + self.mins[panel, :, col].float()[..., None]
        return w.reshape(len(ids), -1)

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 [out_features, in_features]."""
        return self.rows(torch.arange(self.out_features))


def pack_blocks(qtype: str, raw: torch.Tensor) -> QuantWeight:
    """GGUF blocks, uint8 [N, K / 32 * block bytes] (a tensor's rows as the file stores them), into panels."""
    if qtype not in QTYPES:
        raise ValueError(f"quantized type {qtype!r} is not one kvmux multiplies; supported: {', '.join(QTYPES)}")
    block_bytes = GGUF_BLOCK_BYTES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"{qtype} blocks must be uint8 [rows, blocks * {block_bytes}], got {raw.dtype} "
                         f"{tuple(raw.shape)}")
    n, blocks = raw.shape[0], raw.shape[1] // block_bytes
    panels = -(-n // PANEL)
    quants = torch.empty(panels, blocks, PANEL_BLOCK_BYTES[qtype], dtype=torch.uint8)
    scales = torch.empty(panels, blocks, PANEL, dtype=torch.float16)
    mins = torch.empty_like(scales) if qtype == "q4_1" else None
    header = 4 if qtype == "q4_1" else 2
    for p0 in range(0, panels, PACK_PANELS):
        p1 = min(panels, p0 + PACK_PANELS)
        rows = raw[p0 * PANEL:p1 * PANEL]
        if len(rows) < (p1 - p0) * PANEL:  # the last panel's missing rows: zero scales, so zero weights
            rows = torch.cat([rows, rows.new_zeros((p1 - p0) * PANEL - len(rows), rows.shape[1])])
        b = rows.reshape(p1 - p0, PANEL, blocks, block_bytes)
        scales[p0:p1] = b[..., 0:2].contiguous().view(torch.float16)[..., 0].transpose(1, 2)
        if mins is not None:
            mins[p0:p1] = b[..., 2:4].contiguous().view(torch.float16)[..., 0].transpose(1, 2)
        q = b[..., header:]
        if qtype == "q8_0":  # chunk g, byte 2c + i: row c, k = 2g + i
            quants[p0:p1] = q.reshape(p1 - p0, PANEL, blocks, 16, 2).permute(0, 2, 3, 1, 4).flatten(2)
        else:  # GGUF byte j holds k = j (low nibble) and j + 16; chunk h, byte 4c + i: k = 8h + i | 8h + 4 + i
            k = torch.cat((q & 15, q >> 4), dim=-1).reshape(p1 - p0, PANEL, blocks, 4, 2, 4)
            quants[p0:p1] = (k[..., 0, :] | (k[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).flatten(2)
    return QuantWeight(qtype, n, blocks * BLOCK, quants, scales, mins)


def quantize_q8_0(weight: torch.Tensor) -> QuantWeight:
    """A float weight [N, K] (K a multiple of 32) quantized to Q8_0 as llama.cpp does (the gguf package's)."""
    import gguf

    raw = gguf.quants.quantize(weight.detach().float().contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return pack_blocks("q8_0", torch.from_numpy(raw))


class QuantLinear:
    """x -> x @ weight.T (+ bias) by one kernel variant. The weight, bias and kernel are checked once, here: a
    layer's matmul runs every step, and re-checking what never changes cost as much as a small matmul at
    decode's few rows. x is checked on every call."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None, kernel: str = "avx2") -> None:
        k, n = weight.in_features, weight.out_features
        if weight.quants.shape != (-(-n // PANEL), k // BLOCK, PANEL_BLOCK_BYTES[weight.qtype]) or k % BLOCK:
            raise ValueError(f"quant_linear: {weight.qtype} quants {tuple(weight.quants.shape)} are not the panels "
                             f"of a [{n}, {k}] weight (see pack_blocks)")
        if kernel not in runnable_kernels():
            if kernel not in KERNELS:
                raise ValueError(f"quant_linear: no kernel variant {kernel!r}; choose from {', '.join(KERNELS)}")
            kernel_choice.check_runnable(kernel_choice.variant("linear", kernel, weight.qtype))
        # Held, so the addresses the kernel is given stay valid for as long as this lives.
        self.weight, self.bias = weight, linear_bias("quant_linear", bias, n)
        self.in_features, self.out_features = k, n
        self.weight_args = (QTYPES[weight.qtype], weight.quants.data_ptr(), weight.scales.data_ptr(),
                            0 if weight.mins is None else weight.mins.data_ptr(), n,
                            0 if self.bias is None else self.bias.data_ptr())
        self.kernel = KERNELS[kernel]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        x, out = linear_input("quant_linear", x, k, n)
        rows = x.shape[0]
        if rows:
            _native.quant_linear(x.data_ptr(), rows, k, x.stride(0) if rows > 1 else k, *self.weight_args,
                                 out.data_ptr(), n, self.kernel, threads())
        return out


def quant_linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None,
                 kernel: str = "avx2") -> torch.Tensor:
    """x [M, K] float32 @ weight.T (+ bias [N] float32), by the `kernel` variant (the model's Dispatch names the
    one timed fastest; the AVX2 baseline by default)."""
    return QuantLinear(weight, bias, kernel)(x)
