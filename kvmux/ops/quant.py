"""Weights kept in GGUF's quantized blocks, multiplied by the native int8 kernels.

A GGUF row is a run of blocks: an fp16 scale d (some types also an fp16
offset m) and integers, w = d (q - off) + m; kvmux/ops/gguf_blocks.py reads
each type kvmux keeps (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q4_K,
Q5_K, Q6_K) into one of six forms (QTYPES). `pack_parts` keeps those numbers,
rearranged once into panels of 16 rows whose integers interleave along K
(native/cpu/quant_linear.h), in the file's bits per weight: Q8_0, Q4 and Q5 in
its own bytes (34, 18, 20, 22 or 24 per 32 weights instead of 128 in float32),
Q5 and Q6_K as Q4's nibbles and planes of their fifth (and sixth) bits the
kernels add as 16 (and 32) where set; Q6_K 28 bytes per 32 against the file's
26.25 (an fp16 scale per 16 where it has an int8 one). `quant_linear`
quantizes the activations per block on the fly, to int8 for every form but
Q8_0 (as llama.cpp does) and to int16 for Q8_0 (whose accuracy byte
activations would spoil), under one scale per block, or for the K-quants per
4 blocks (`activation_span`), and runs
integer dot products (vpdpbusd / vpdpwssd with VNNI, vpmaddubsw / vpmaddwd on
plain AVX2) with one float multiply-add per block. `QuantWeight.rows`
dequantizes single rows (embedding lookups), so a quantized embedding is also
the tied LM head.

The kernel variants (avx2, avxvnni, avx512vnni, amx) are kernel_choice's linear
variants for these formats: the model times them per shape at load like the
float kernels (kvmux/ops/linear.py), and KVMUX_KERNELS=linear=avx2 forces one.
One more, amx_bf16, quantizes nothing: it dequantizes the weight to bf16 an
L2-sized chunk of panels at a time and multiplies x rounded to bf16 by it with
AMX tiles, which pays once a call what the int8 variants pay once a row and
block, so it wins at prefill's hundreds of rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvmux import _native
from kvmux.ops import kernel_choice
from kvmux.ops.gguf_blocks import FORM_OF, GGUF_BLOCK, Rows, decode, widen
from kvmux.ops.tensor_checks import linear_bias, linear_input
from kvmux.ops.threads import threads

BLOCK = _native.QUANT_BLOCK  # values per block along K (Q6_K's: BLOCKS)
PANEL = _native.QUANT_PANEL  # rows per panel
QTYPES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q5_0": 3, "q5_1": 4, "q6_k": 5}  # the forms: the native QuantType
BLOCKS = {**dict.fromkeys(QTYPES, BLOCK), "q6_k": 16}
ACTIVATION_BITS = {**dict.fromkeys(QTYPES, 8), "q8_0": 16}  # what the activations are quantized to, per form
# Every form but Q8_0 (a signed byte each) keeps its integers' low 4 bits two a byte, then its high bits in planes.
HIGH_PLANES = {"q4_0": 0, "q4_1": 0, "q5_0": 1, "q5_1": 1, "q6_k": 2}
MINS = ("q4_1", "q5_1")
# Bytes of one panel's integers for one block.
PANEL_BLOCK_BYTES = {f: PANEL * BLOCKS[f] if f == "q8_0" else PANEL * BLOCKS[f] // 2 + 2 * BLOCKS[f] * HIGH_PLANES[f]
                     for f in QTYPES}
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.uint8)  # bit j of a mask byte
# Blocks of a K-quant weight's activations under one scale (128 values for Q4_K and Q5_K, 64 for Q6_K): the
# int8 tiles then apply it once a span rather than once a block (native/cpu/quant_tile_loop.h). Measured on
# Gemma 3 270M Q4_K_M (bench.kquants' teacher-forced agreement with float32; a 2-core EPYC, 8 rows): per block,
# 98.45%; 4 blocks, 97.63% and Q4_K's matmul 5% faster, Q6_K's 8%; 256 values as llama.cpp's Q8_K, 96.22% and
# 1-2% faster still (llama.cpp's own: 95.40%).
KQUANT_SPAN_BLOCKS = 4
# kernel_choice's linear variants for these formats -> the native QuantKernel.
KERNELS = {"avx2": 0, "avxvnni": 1, "avx512vnni": 2, "amx": 3, "amx_bf16": 4}
# The variants that quantize no activations: x and the dequantized weight rounded to bf16 instead.
BF16_KERNELS = ("amx_bf16",)
# Weights packed at a time (in whole panels): the torch ops that rearrange them take some 15 bytes of scratch per
# weight, so steps of 256 panels (4096 rows; a Q6_K down_proj's 640 whole) took 18-25 MB for a moment, the peak
# of a small model's load; 4-8 MB at this size, as fast.
PACK_WEIGHTS = 1 << 19


@functools.cache
def runnable_kernels() -> frozenset[str]:
    """The variants this CPU runs (checked once: quant_linear runs per matmul)."""
    return frozenset(v.name for v in kernel_choice.runnable("linear", "q8_0"))


@dataclass(eq=False, frozen=True)  # frozen: QuantLinear holds its tensors' addresses
class QuantWeight:
    """A [out_features, in_features] weight in quantized panels (see the module docstring)."""

    qtype: str                  # the form (QTYPES)
    out_features: int
    in_features: int
    quants: torch.Tensor        # uint8 [panels, blocks, PANEL_BLOCK_BYTES]
    scales: torch.Tensor        # float16 [panels, blocks, PANEL]
    mins: torch.Tensor | None   # float16 [panels, blocks, PANEL], q4_1 and q5_1 only
    span: int                   # values of a row of x that share one activation scale (activation_span)

    def __post_init__(self) -> None:
        block = BLOCKS[self.qtype]
        if self.in_features % BLOCK:  # Q6_K's blocks are 16, but every kernel steps K by 32 (bf16 pairs, tiles)
            raise ValueError(f"in_features must be a multiple of {BLOCK}, got {self.in_features}")
        if self.span <= 0 or self.span % block or self.in_features % self.span:
            raise ValueError(f"span must be a multiple of the block ({block}) dividing in_features "
                             f"({self.in_features}), got {self.span}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.quants, self.scales, self.mins) if t is not None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (1-D) of the weight, dequantized to float32 [len(ids), in_features] (an embedding lookup)."""
        if ids.dim() != 1:
            raise ValueError(f"rows: need 1-D ids, got shape {tuple(ids.shape)}")
        ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
        if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < self.out_features):
            bad = ids[(ids < 0) | (ids >= self.out_features)][0]
            raise IndexError(f"row {int(bad)} is out of range: the weight has {self.out_features} rows")
        out = torch.empty(len(ids), self.in_features)
        _native.quant_rows(QTYPES[self.qtype], self.quants.data_ptr(), self.scales.data_ptr(),
                           0 if self.mins is None else self.mins.data_ptr(), self.out_features, self.in_features,
                           ids.data_ptr(), len(ids), out.data_ptr())
        return out

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 [out_features, in_features]."""
        return self.rows(torch.arange(self.out_features))


def _panels(rows: Rows, quants: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> None:
    """Whole panels of `rows` (a multiple of PANEL of them) into the given slices of a QuantWeight's tensors."""
    n, blocks, size = rows.q.shape[0], rows.d.shape[1], BLOCKS[rows.form]
    p = n // PANEL
    scales.copy_(rows.d.reshape(p, PANEL, blocks).transpose(1, 2))
    if mins is not None:
        mins.copy_(rows.m.reshape(p, PANEL, blocks).transpose(1, 2))
    q = rows.q.reshape(p, PANEL, blocks, size)
    if rows.form == "q8_0":  # chunk g, byte 2c + i: row c, k = 2g + i
        quants.copy_(q.reshape(p, PANEL, blocks, 16, 2).permute(0, 2, 3, 1, 4).flatten(2))
    else:  # chunk h, byte 4c + i: k = 8h + i (low nibble) | 8h + 4 + i (high)
        chunks, planes, nibbles = size // 8, HIGH_PLANES[rows.form], PANEL * size // 2
        k = q.reshape(p, PANEL, blocks, chunks, 2, 4)
        low, high = k[..., 0, :] & 15, k[..., 1, :] & 15
        quants[..., :nibbles].copy_((low | (high << 4)).permute(0, 2, 3, 1, 4).flatten(2))
        if planes:  # chunk h, plane j, half (low, high nibbles): a 64-bit mask, bit 4c + i of byte 4c + i's bit 4 + j
            bits = torch.stack([(k >> (4 + j)) & 1 for j in range(planes)], dim=3)   # [p, c, blocks, j, h, 2, 4]
            bits = bits.permute(0, 2, 4, 3, 5, 1, 6).reshape(p, blocks, chunks, planes, 2, 8, 8)
            quants[..., nibbles:].copy_((bits * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8).flatten(2))


def _read(parts: list[tuple[str, torch.Tensor]], form: str, r0: int, r1: int) -> Rows:
    """Rows r0..r1 of the parts stacked, in `form`."""
    pieces, start = [], 0
    for gguf_type, raw in parts:
        a, b = max(r0, start), min(r1, start + raw.shape[0])
        if a < b:
            pieces.append(widen(decode(gguf_type, raw[a - start:b - start]), form))
        start += raw.shape[0]
    return Rows(form, *(None if getattr(pieces[0], f) is None else torch.cat([getattr(r, f) for r in pieces])
                        for f in ("q", "d", "m")))


def pack_parts(parts: list[tuple[str, torch.Tensor]], form: str | None = None) -> QuantWeight:
    """GGUF tensors stacked along their rows (a merged matmul's parts), each (GGUF type, uint8 blocks [rows,
    bytes per row] as the file stores them), into one QuantWeight of `form` (None: the first type's own; the
    others must fit it exactly, gguf_blocks.common_form). Read PACK_WEIGHTS at a time, so packing a large
    tensor needs little scratch memory."""
    parts = [(t.upper(), raw) for t, raw in parts]
    for t, raw in parts:
        if t not in FORM_OF:
            raise ValueError(f"quantized type {t!r} is not one kvmux multiplies; supported: {', '.join(FORM_OF)}")
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % GGUF_BLOCK[t][0]:
            raise ValueError(f"{t} blocks must be uint8 [rows, blocks * {GGUF_BLOCK[t][0]}], got {raw.dtype} "
                             f"{tuple(raw.shape)}")
    form = form or FORM_OF[parts[0][0]]
    lengths = {raw.shape[1] // GGUF_BLOCK[t][0] * GGUF_BLOCK[t][1] for t, raw in parts}
    if len(lengths) != 1:
        raise ValueError(f"parts of one weight have different row lengths {sorted(lengths)}")
    k, n = lengths.pop(), sum(raw.shape[0] for _, raw in parts)
    panels, blocks = -(-n // PANEL), k // BLOCKS[form]
    quants = torch.empty(panels, blocks, PANEL_BLOCK_BYTES[form], dtype=torch.uint8)
    scales = torch.empty(panels, blocks, PANEL, dtype=torch.float16)
    mins = torch.empty_like(scales) if form in MINS else None
    step = max(1, PACK_WEIGHTS // (PANEL * k))
    for p0 in range(0, panels, step):
        p1 = min(panels, p0 + step)
        rows = _read(parts, form, p0 * PANEL, min(n, p1 * PANEL))
        pad = (p1 - p0) * PANEL - len(rows.q)  # the last panel's missing rows: zero scales, so zero weights
        if pad:
            rows = Rows(form, *(None if x is None else torch.cat([x, x.new_zeros(pad, x.shape[1])])
                                for x in (rows.q, rows.d, rows.m)))
        _panels(rows, quants[p0:p1], scales[p0:p1], None if mins is None else mins[p0:p1])
    return QuantWeight(form, n, k, quants, scales, mins, activation_span(form, [t for t, _ in parts]))


def activation_span(form: str, gguf_types: list[str]) -> int:
    """Values of x quantized under one scale for a weight of `form` stacked from these GGUF types: the form's
    block for the legacy types (llama.cpp's Q8_0 and Q8_1), KQUANT_SPAN_BLOCKS blocks for the K-quants."""
    k_quants = all(GGUF_BLOCK[t.upper()][1] > BLOCK for t in gguf_types)
    return BLOCKS[form] * (KQUANT_SPAN_BLOCKS if k_quants else 1)


def pack_blocks(gguf_type: str, raw: torch.Tensor) -> QuantWeight:
    """One GGUF tensor's blocks, uint8 [N, bytes per row], into panels of its type's form."""
    return pack_parts([(gguf_type, raw)])


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
        size = BLOCKS[weight.qtype]
        if weight.quants.shape != (-(-n // PANEL), k // size, PANEL_BLOCK_BYTES[weight.qtype]) or k % size:
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
                            0 if weight.mins is None else weight.mins.data_ptr(), weight.span, n,
                            0 if self.bias is None else self.bias.data_ptr())
        self.kernel = KERNELS[kernel]

    def native_call(self) -> _native.MatmulCall:
        """This call for native code that runs it itself (kvmux/model/native_stack.py); self must outlive it."""
        return _native.quant_matmul_call(*self.weight_args[:5], self.out_features, self.in_features,
                                         self.weight_args[6], self.kernel)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        x, out = linear_input("quant_linear", x, k, n, out)
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
