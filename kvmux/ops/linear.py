"""The model's CPU matmuls: weights packed once at load, multiplied by the native kernel.

torch's F.linear hands MKL a weight in its [N, K] storage, and MKL repacks it
on every call; at the few rows of a decode step that repacking is most of the
time. The engine owns its weights, so it packs each one once into 16-wide
panels ([ceil(N/16), K, 16], see native/packed_linear.h) and `packed_linear`
multiplies by them. Measured with SmolLM2-135M's shapes on this project's
2-core AVX2 machine (`python -m bench.linear`), it is faster than F.linear up
to a few hundred rows and on par above, so a packed model never calls
F.linear; the packed weight also serves embedding lookups (`packed_rows`), so
a tied embedding is stored once.

Panels are float32 or bf16; activations are float32 either way. A CPU without
bf16 arithmetic (this one) multiplies bf16 at a fraction of the float32 rate,
so bf16 weights are widened as the kernel reads them: half the memory and
weight traffic, float32 arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmux import _native
from kvmux.ops.tensor_checks import linear_operands

PANEL = _native.PANEL_WIDTH
PANEL_DTYPES = (torch.float32, torch.bfloat16)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (float32 or bf16, CPU) -> [ceil(N / PANEL), K, PANEL] of the same dtype, zero-padded past N."""
    if weight.dtype not in PANEL_DTYPES or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"pack_weight: need a 2-D float32 or bfloat16 CPU weight, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    n, k = weight.shape
    if n % PANEL:
        weight = F.pad(weight, (0, 0, 0, -n % PANEL))
    return weight.reshape(-1, PANEL, k).transpose(1, 2).contiguous()


def _check_packed(packed: torch.Tensor, out_features: int) -> None:
    if (packed.dtype not in PANEL_DTYPES or packed.device.type != "cpu" or packed.dim() != 3
            or packed.shape[2] != PANEL or not packed.is_contiguous() or packed.shape[0] != -(-out_features // PANEL)):
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} on {packed.device} is not a packed "
                         f"CPU weight of {out_features} output features (see pack_weight)")


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight.T (+ bias [N]) where packed = pack_weight(weight); x, bias and the result float32."""
    _check_packed(packed, out_features)
    in_features = packed.shape[1]
    x, bias, out = linear_operands("packed_linear", x, in_features, out_features, bias)
    rows = x.shape[0]
    if rows:
        _native.packed_linear(x.data_ptr(), rows, in_features, x.stride(0) if rows > 1 else in_features,
                              packed.data_ptr(), packed.dtype == torch.bfloat16, out_features,
                              0 if bias is None else bias.data_ptr(), out.data_ptr(), out_features,
                              torch.get_num_threads())
    return out


def packed_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the original [N, K] weight, read from its packed form (an embedding lookup)."""
    return packed[ids // PANEL, :, ids % PANEL]
