"""GGUF's quantized blocks read into the integers, scales and offsets the int8 kernels multiply.

Every type kvmux keeps quantized is read into one of the kernels' forms (kvmux/ops/quant.py), row by row:
w = d (q - off) + m per block of B values along a row, q unsigned (Q8_0's signed), d and m float16.

    GGUF type  form  B   q        off  m    bytes per 32 weights in the file
    Q8_0       q8_0  32  -128..127  0   -    34
    Q4_0       q4_0  32  0..15      8   -    18
    Q4_1       q4_1  32  0..15      0   yes  20
    Q5_0       q5_0  32  0..31     16   -    22
    Q5_1       q5_1  32  0..31      0   yes  24
    Q4_K       q4_1  32  0..15      0   yes  18   (144 per super-block of 256)
    Q5_K       q5_1  32  0..31      0   yes  22   (176 per 256)
    Q6_K       q6_k  16  0..63     32   -    26.25 (210 per 256)

The K-quants hold 8 (Q6_K: 16) sub-blocks under one fp16 super-scale d (and dmin), each with its own small
integer scale (and min); their d (and m) here are the products d * scale (and -dmin * min), exact in float32
and rounded to float16 (a relative error of at most 2^-11, a few hundredths of one step of the 4-bit
integers). The layouts are llama.cpp's (ggml-quants.c), decoded with torch ops; the suite checks every type
against the gguf package's dequantize.

A tensor's rows can also be read into a wider form than their own, exactly: Q4_0 and Q5_0 into Q8_0, Q4_0 into
Q5_0, Q4_1 into Q5_1, so a merged matmul (q, k and v) whose parts differ in type still runs as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORM_OF = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1",
           "Q4_K": "q4_1", "Q5_K": "q5_1", "Q6_K": "q6_k"}  # GGUF type name -> the kernels' form
# Bytes of one GGUF block and the values it holds.
GGUF_BLOCK = {"Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q5_1": (24, 32),
              "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256)}
# The forms each form's integers fit into exactly (besides itself).
WIDER = {"q4_0": ("q5_0", "q8_0"), "q5_0": ("q8_0",), "q4_1": ("q5_1",)}
OFFSET = {"q4_0": 8, "q5_0": 16, "q6_k": 32}


@dataclass
class Rows:
    """Rows of a weight in a kernel form: w = d (q - OFFSET[form]) + m per block."""

    form: str
    q: torch.Tensor         # uint8 [N, K] (q8_0: int8 bits)
    d: torch.Tensor         # float16 [N, K / B]
    m: torch.Tensor | None  # float16 [N, K / B] for q4_1 and q5_1


def fits(gguf_types: list[str], form: str) -> bool:
    """Whether rows of all these types read into `form` exactly."""
    return all(FORM_OF.get(t) == form or form in WIDER.get(FORM_OF.get(t), ()) for t in gguf_types)


def common_form(gguf_types: list[str]) -> str | None:
    """The narrowest form all these types' rows read into exactly (their own if they agree), or None."""
    return next((f for f in ("q4_0", "q4_1", "q5_0", "q5_1", "q6_k", "q8_0") if fits(gguf_types, f)), None)


def form_runs(gguf_types: list[str]) -> list[tuple[int, int, str]] | None:
    """The parts of a merged matmul, in order, as runs (start, end, form) that each read into one form exactly:
    one run where they share a form, more where they do not (Q4_K q and k beside a Q6_K v, as llama.cpp's
    Q4_K_M files have in many layers); None where a type has no form."""
    runs: list[tuple[int, int, str]] = []
    for i in range(len(gguf_types)):
        joined = runs and common_form(gguf_types[runs[-1][0]:i + 1])
        if joined:
            runs[-1] = (runs[-1][0], i + 1, joined)
        elif (own := common_form(gguf_types[i:i + 1])) is not None:
            runs.append((i, i + 1, own))
        else:
            return None
    return runs


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> float16 [...], little-endian as GGUF stores them."""
    return b.contiguous().view(torch.float16)[..., 0]


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """[..., n] bytes -> [..., n * 8] of their bits, least significant first; the first `count` of them."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b[..., :, None] >> shifts) & 1).flatten(-2)[..., :count]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes of a 32-block -> [..., 32]: byte j holds value j (low nibble) and j + 16 (high)."""
    return torch.cat((qs & 15, qs >> 4), dim=-1)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins -> two [..., 8] int32 (ggml's get_scale_min_k4)."""
    s = scales.int()
    sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)), dim=-1)
    mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), dim=-1)
    return sc, mn


def decode(gguf_type: str, raw: torch.Tensor) -> Rows:
    """GGUF blocks uint8 [N, bytes per row] (rows as the file stores them) in their own form."""
    n = raw.shape[0]
    b = raw.reshape(n, -1, GGUF_BLOCK[gguf_type][0])
    m = None
    if gguf_type == "Q8_0":
        d, q = _f16(b[..., 0:2]), b[..., 2:]
    elif gguf_type == "Q4_0":
        d, q = _f16(b[..., 0:2]), _nibbles(b[..., 2:])
    elif gguf_type == "Q4_1":
        d, m, q = _f16(b[..., 0:2]), _f16(b[..., 2:4]), _nibbles(b[..., 4:])
    elif gguf_type in ("Q5_0", "Q5_1"):
        head = 2 if gguf_type == "Q5_0" else 4
        d = _f16(b[..., 0:2])
        m = _f16(b[..., 2:4]) if gguf_type == "Q5_1" else None
        q = _nibbles(b[..., head + 4:]) | (_bits(b[..., head:head + 4], 32) << 4)
    elif gguf_type in ("Q4_K", "Q5_K"):
        # d, dmin, 12 bytes of scales, (Q5_K: 32 bytes of high bits), 128 bytes of nibbles: 64 values per 32
        # bytes, the low nibbles sub-block 2i and the high ones 2i + 1.
        sd, smin = _f16(b[..., 0:2]).float(), _f16(b[..., 2:4]).float()
        sc, mn = _scale_min_k4(b[..., 4:16])
        qs = b[..., -128:].reshape(n, -1, 4, 1, 32)
        q = torch.cat((qs & 15, qs >> 4), dim=-2).reshape(n, -1, 8, 32)        # [N, super, sub-block, 32]
        if gguf_type == "Q5_K":
            high = _bits(b[..., 16:48], 256).reshape(n, -1, 32, 8).transpose(-1, -2)  # byte l, bit j: sub j, l
            q = q | (high << 4)
        d = (sd[..., None] * sc).half()
        m = (-smin[..., None] * mn).half()
    elif gguf_type == "Q6_K":
        # 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d; two halves of 128 values, each of four
        # runs of 32: l + 32 j takes ql[l + 32 (j & 1)] (low nibble for j < 2), qh[l] bits 2j, 2j + 1.
        ql = b[..., 0:128].reshape(n, -1, 2, 2, 32)            # [N, super, half, j & 1, l]
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
        low = torch.cat((ql & 15, ql >> 4), dim=-2)            # [N, super, half, j, l]
        high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3
        q = (low | (high << 4)).reshape(n, -1, 256)
        scales = b[..., 192:208].contiguous().view(torch.int8).float()   # [N, super, 16]
        d = (_f16(b[..., 208:210]).float()[..., None] * scales).half()
    else:
        raise ValueError(f"GGUF type {gguf_type} has no kernel form; kept: {', '.join(FORM_OF)}")
    return Rows(FORM_OF[gguf_type], q.reshape(n, -1), d.reshape(n, -1), None if m is None else m.reshape(n, -1))


def widen(rows: Rows, form: str) -> Rows:
    """Rows in a wider form that holds them exactly (WIDER)."""
    if rows.form == form:
        return rows
    if form not in WIDER.get(rows.form, ()):
        raise ValueError(f"{rows.form} rows do not fit the {form} form exactly")
    if form == "q8_0":  # signed integers, the offset taken out
        q = (rows.q.to(torch.int16) - OFFSET[rows.form]).to(torch.int8).view(torch.uint8)
    elif form == "q5_0":  # q4_0's q - 8 is (q + 8) - 16
        q = rows.q + 8
    else:  # q4_1 -> q5_1: the same integers
        q = rows.q
    return Rows(form, q, rows.d, rows.m)
