"""The model's CPU matmuls: weights packed once at load, and per shape and row count the kernel timed fastest.

torch's F.linear hands MKL a weight in its [N, K] storage, and MKL repacks it
on every call; at the few rows of a decode step that repacking is most of the
time. The engine owns its weights, so it packs each one once into 16-wide
panels (native/cpu/packed_linear.h) and the native kernels multiply by them;
the packed weight also serves embedding lookups (`packed_rows`), so a tied
embedding is stored once.

Activations are float32 whatever the weights' dtype. float32 panels run the
AVX2 kernel. bf16 panels have several kernels (kernel_choice.VARIANTS): the
AVX2 one widens the weights to float32 as it reads them (CPUs without bf16
arithmetic: half the weight memory and traffic at float32 speed); on CPUs
with bf16 units the AVX512-BF16 and AMX kernels round x to bf16 and multiply
bf16 pairs into float32 sums. Which is fastest depends on the shape and the
row count, so `plan_linears` times the candidates at load on the model's own
weights, per row range. torch's F.linear in bf16 (oneDNN, over an [N, K] copy
of the weight) runs when KVMUX_KERNELS names it: its results are bf16, which
cost more accuracy than the issue allows (kernel_choice.VARIANTS).
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Protocol

import torch
import torch.nn.functional as F

from kvmux import _native
from kvmux.ops import kernel_choice
from kvmux.ops.heap import trim_heap
from kvmux.ops.quant import KERNELS as QUANT_KERNELS
from kvmux.ops.quant import PANEL as QUANT_PANEL
from kvmux.ops.quant import QuantLinear, QuantWeight
from kvmux.ops.tensor_checks import linear_bias, linear_input
from kvmux.ops.threads import set_threads, threads

log = logging.getLogger("kvmux")

PANEL = _native.PANEL_WIDTH
K_ALIGN = _native.BF16_K_ALIGN  # bf16 panels pad K to a multiple of this
PANEL_DTYPES = (torch.float32, torch.bfloat16)
_K = _native.LinearKernel
DEFAULT_KERNELS = {torch.float32: _K.f32_avx2, torch.bfloat16: _K.bf16_widen_avx2}  # packed_linear's, by dtype


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (float32 or bf16, CPU) -> its panels, zero-padded past N (and for bf16 past K):
    float32 [ceil(N / PANEL), K, PANEL]; bf16 [ceil(N / PANEL), Kp / 2, PANEL, 2], Kp = K rounded up to K_ALIGN,
    each panel row holding PANEL features x 2 consecutive k (the bf16 dot-product and AMX operand layout)."""
    if weight.dtype not in PANEL_DTYPES or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"pack_weight: need a 2-D float32 or bfloat16 CPU weight, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    n, k = weight.shape
    if weight.dtype == torch.float32:
        return F.pad(weight, (0, 0, 0, -n % PANEL)).reshape(-1, PANEL, k).transpose(1, 2).contiguous()
    padded = F.pad(weight, (0, -k % K_ALIGN, 0, -n % PANEL))
    return padded.reshape(-1, PANEL, padded.shape[1] // 2, 2).transpose(1, 2).contiguous()


def _check_packed(packed: torch.Tensor, in_features: int, out_features: int) -> None:
    float32 = packed.dtype == torch.float32 and packed.dim() == 3 and packed.shape[1:] == (in_features, PANEL)
    bf16 = (packed.dtype == torch.bfloat16 and packed.dim() == 4
            and packed.shape[1:] == (-(-in_features // K_ALIGN) * K_ALIGN // 2, PANEL, 2))
    if not (float32 or bf16) or packed.device.type != "cpu" or not packed.is_contiguous() \
            or packed.shape[0] != -(-out_features // PANEL):
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} on {packed.device} is not a packed "
                         f"CPU weight of {out_features} x {in_features} features (see pack_weight)")


class PackedLinear:
    """x -> x @ weight.T (+ bias) for packed = pack_weight(weight), by `kernel` (it must suit the panels' dtype,
    as MATMULS pairs them; None: the AVX2 one for it). Panels, bias and kernel are checked once, here, as
    QuantLinear does; x on every call."""

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, kernel: _native.LinearKernel | None = None) -> None:
        _check_packed(packed, in_features, out_features)
        if kernel is None:
            kernel = DEFAULT_KERNELS[packed.dtype]
        elif (kernel == _K.f32_avx2) != (packed.dtype == torch.float32):
            raise ValueError(f"packed_linear: kernel {kernel.name} does not take {packed.dtype} panels")
        # Held, so the addresses the kernel is given stay valid for as long as this lives.
        self.packed, self.bias = packed, linear_bias("packed_linear", bias, out_features)
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel

    def native_call(self) -> _native.MatmulCall:
        """This call for native code that runs it itself (kvmux/model/native_stack.py); self must outlive it."""
        return _native.packed_matmul_call(self.kernel, self.packed.data_ptr(), self.out_features, self.in_features,
                                          0 if self.bias is None else self.bias.data_ptr())

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        x, out = linear_input("packed_linear", x, k, n, out)
        rows = x.shape[0]
        if rows:
            _native.packed_linear(self.kernel, x.data_ptr(), rows, k, x.stride(0) if rows > 1 else k,
                                  self.packed.data_ptr(), n, 0 if self.bias is None else self.bias.data_ptr(),
                                  out.data_ptr(), n, threads())
        return out


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                  kernel: _native.LinearKernel | None = None) -> torch.Tensor:
    """x [M, K] @ weight.T (+ bias [N]) where packed = pack_weight(weight); x, bias and the result float32."""
    return PackedLinear(packed, x.shape[-1], out_features, bias, kernel)(x)


def packed_rows(packed: torch.Tensor, ids: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows `ids` of the original [N, K] weight, read from its packed form (an embedding lookup)."""
    if packed.dim() == 3:
        return packed[ids // PANEL, :, ids % PANEL]
    return packed[ids // PANEL, :, ids % PANEL, :].reshape(ids.shape[0], -1)[:, :in_features]


def onednn_linear(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """torch's F.linear in dense's dtype (oneDNN for bf16), float32 in and out like the native kernels."""
    result = F.linear(x.to(dense.dtype), dense).float()
    if bias is not None:
        result.add_(bias)
    return result if out is None else out.copy_(result)


class PackedLayer(Protocol):
    """What planning needs of a matmul layer (kvmux.model.llama.Linear once packed)."""

    weight: torch.Tensor | None       # pack_weight's panels (None when quantized)
    quant: QuantWeight | None         # quantized blocks (kvmux/ops/quant.py)
    bias: torch.Tensor | None         # float32
    dense: torch.Tensor | None        # [N, K] copy of the weight, only while the onednn variant needs it
    in_features: int
    out_features: int
    weight_format: str                # what its kernels take: a float dtype (float32, bfloat16) or a quantized form


Matmul = Callable[..., torch.Tensor]  # x (, out=) -> x W^T + b of one layer (into `out` where given)


def _native_matmul(kernel: _native.LinearKernel) -> Callable[[PackedLayer], Matmul]:
    return lambda layer: PackedLinear(layer.weight, layer.in_features, layer.out_features, layer.bias, kernel)


def _quant_matmul(variant: str) -> Callable[[PackedLayer], Matmul]:
    return lambda layer: QuantLinear(layer.quant, layer.bias, variant)


def _onednn_matmul(layer: PackedLayer) -> Matmul:
    if layer.dense is None:
        layer.dense = packed_rows(layer.weight, torch.arange(layer.out_features), layer.in_features)
    return functools.partial(onednn_linear, dense=layer.dense, bias=layer.bias)


# (variant, format) -> what makes one layer's x -> x W^T + b by that variant: one entry per kernel_choice
# Variant and format it takes (a new weight format adds its own).
MATMULS: dict[tuple[str, str], Callable[[PackedLayer], Matmul]] = {
    ("avx2", "float32"): _native_matmul(_K.f32_avx2),
    ("avx2", "bfloat16"): _native_matmul(_K.bf16_widen_avx2),
    ("avx512bf16", "bfloat16"): _native_matmul(_K.bf16_avx512),
    ("amx", "bfloat16"): _native_matmul(_K.bf16_amx),
    ("onednn", "bfloat16"): _onednn_matmul,
    **{(variant, qtype): _quant_matmul(variant) for variant in QUANT_KERNELS
       for qtype in kernel_choice.QUANT_FORMATS},
}


def matmul(variant: str, layer: PackedLayer) -> Matmul:
    """x -> x W^T + b for one packed layer, by the named variant."""
    return MATMULS[variant, layer.weight_format](layer)


@dataclass(frozen=True)
class RowRange:
    most: int | None  # rows in the range: above the previous range's `most`, up to this (None: no bound)
    timed: int        # the row count the candidates are timed at

    def label(self, previous: int) -> str:
        return f"{previous + 1}+" if self.most is None else f"{previous + 1}-{self.most}"


# Decode steps (a few to tens of rows) to prefill chunks (hundreds); above 128 rows every kernel is bound by
# arithmetic, so one timing stands for all.
ROW_RANGES = (RowRange(2, 1), RowRange(8, 4), RowRange(32, 16), RowRange(128, 64), RowRange(None, 256))
TIMED_LAYERS = 8  # layers of a shape the timed calls take in turn, so their weights stream as in a step
# A huge matmul (a large lm_head) is timed on its first output features only, so that loading stays quick; at the
# range's own row count, because the kernels' order changes with it (Gemma 3's 262k x 640 Q8_0 lm_head: AVX512-VNNI
# fastest at 5 rows, AMX 1.7x faster at 64).
FLOP_CAP = 2e9


@dataclass
class ShapePlan:
    """The kernel for one matmul shape and weight format, per row range, and what each candidate measured."""

    out_features: int
    in_features: int
    dtype: str
    layers: int
    variants: list[str]  # per ROW_RANGES
    micros: list[dict[str, float]]  # per ROW_RANGES: CPU microseconds per call (one thread), each candidate timed

    @property
    def bounds(self) -> list[int]:
        return [r.most for r in ROW_RANGES[:-1]]

    def describe(self) -> dict:
        ranges, previous = [], 0
        for r, chosen, micros in zip(ROW_RANGES, self.variants, self.micros):
            ranges.append({"rows": r.label(previous), "variant": chosen,
                           "cpu_us_per_call": {k: round(v, 1) for k, v in micros.items()}})
            previous = r.most or previous
        return {"shape": [self.out_features, self.in_features], "dtype": self.dtype, "layers": self.layers,
                "ranges": ranges}


def _timing_slice(layer: PackedLayer, rows: int) -> PackedLayer:
    """The layer, or for a matmul over FLOP_CAP at `rows` its first whole panels of output features (every weight
    format keeps its panels along its first dimension), as large as the cap allows."""
    n, k = layer.out_features, layer.in_features
    if 2 * rows * n * k <= FLOP_CAP:
        return layer
    panels = max(4, int(FLOP_CAP // (2 * rows * k * PANEL)))
    quant = layer.quant
    if quant is not None:
        quant = replace(quant, out_features=panels * QUANT_PANEL, quants=quant.quants[:panels],
                        scales=quant.scales[:panels], mins=None if quant.mins is None else quant.mins[:panels])
    width = panels * (QUANT_PANEL if quant is not None else PANEL)
    return SimpleNamespace(weight=None if layer.weight is None else layer.weight[:panels], quant=quant,
                           bias=None if layer.bias is None else layer.bias[:width],
                           dense=None if layer.dense is None else layer.dense[:width], in_features=k,
                           out_features=width, weight_format=layer.weight_format)


def plan_shape(layers: Sequence[PackedLayer]) -> ShapePlan:
    """Time every candidate kernel on these layers (one shape and dtype) per row range (kernel_choice.at_rows);
    keep the fastest. Timed on one thread, in its CPU time (kernel_choice.fastest says why)."""
    first = layers[0]
    dtype = first.weight_format
    found = kernel_choice.candidates("linear", dtype)
    names_at = {r: [v.name for v in kernel_choice.at_rows(found, r.timed)] for r in ROW_RANGES}
    variants, micros = [], []
    team = threads()
    set_threads(1)
    # Every timed call writes into one buffer: a new output per call (megabytes for a large lm_head) left the heap
    # holding several times its size for a moment (kvmux/ops/heap.py), and the peak of a small model's load with it.
    slices = {r: [_timing_slice(layer, r.timed) for layer in layers[:TIMED_LAYERS]] for r in ROW_RANGES}
    space = torch.empty(max((r.timed * s[0].out_features for r, s in slices.items() if len(names_at[r]) > 1),
                            default=0), dtype=torch.float32)
    try:
        for r, timed in slices.items():
            names = names_at[r]
            if len(names) == 1:
                variants.append(names[0])
                micros.append({})
                continue
            x = torch.randn(r.timed, first.in_features)
            out = space[:r.timed * timed[0].out_features].view(r.timed, -1)
            seconds = kernel_choice.fastest({name: [functools.partial(matmul(name, layer), x, out=out)
                                                    for layer in timed] for name in names})
            variants.append(next(iter(seconds)))
            micros.append({name: s * 1e6 for name, s in seconds.items()})
    finally:
        set_threads(team)
    if "onednn" not in variants:
        for layer in layers:
            layer.dense = None
    return ShapePlan(first.out_features, first.in_features, dtype, len(layers), variants, micros)


class Dispatch:
    """A layer's matmul: the planned kernel for the row count of each call."""

    def __init__(self, plan: ShapePlan, layer: PackedLayer) -> None:
        self.bounds = plan.bounds
        self.matmuls = [matmul(v, layer) for v in plan.variants]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmuls[bisect.bisect_left(self.bounds, x.shape[0])](x)

    def native_calls(self) -> list[_native.MatmulCall] | None:
        """Each row range's call for native code (None where one is not a native kernel: oneDNN's)."""
        if not all(hasattr(m, "native_call") for m in self.matmuls):
            return None
        return [m.native_call() for m in self.matmuls]


def plan_linears(layers: Sequence[PackedLayer]) -> list[ShapePlan]:
    """Plan every shape among `layers` and give each its Dispatch (`layer.dispatch`); log the choices."""
    groups: dict[tuple, list[PackedLayer]] = {}
    for layer in layers:
        groups.setdefault((layer.out_features, layer.in_features, layer.weight_format), []).append(layer)
    plans = []
    for group in groups.values():
        plan = plan_shape(group)
        trim_heap()  # its timing's buffers, before the next shape's (kvmux/ops/heap.py)
        for layer in group:
            layer.dispatch = Dispatch(plan, layer)
        plans.append(plan)
        choices = ", ".join(f"{r['rows']} {r['variant']}" for r in plan.describe()["ranges"])
        log.info("linear %d x %d %s (%d layers): rows %s", plan.out_features, plan.in_features, plan.dtype,
                 plan.layers, choices)
    return plans
