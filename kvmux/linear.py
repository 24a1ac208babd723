"""The model's matmuls: torch's BLAS, or the native small-batch kernel where it is faster.

A decode step multiplies a few token rows by every weight of the model, which
is bound by reading the weights from memory. MKL repacks the weights on each
call and so runs far below that bound at a few rows; `kvmux._native`'s
small_linear_f32 streams them once. Measured with SmolLM2-135M's shapes on
this project's 2-core AVX2 machine (`python -m bench.linear`): 1.9x faster at
1 row, 2.5-3x at 2-4, 1.3-1.7x at 8-64, 1.2x at 96-128 and slower from about
192 rows on, where MKL's blocking pays off; so rows up to MAX_NATIVE_ROWS go native.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmux import _native

MAX_NATIVE_ROWS = 128


def _fits_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.dim() == 2 and x.shape[0] > 0 and x.stride(1) == 1 and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.device.type == "cpu")))


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias [N]) with the native kernel; float32 CPU tensors only."""
    if not _fits_kernel(x, weight, bias):
        raise ValueError(f"small_linear: need float32 CPU tensors, x [rows, K] with contiguous rows, contiguous "
                         f"weight and bias; got x {x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}, "
                         f"weight {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    rows, in_features = x.shape
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"small_linear: weight {tuple(weight.shape)} does not take {in_features} input features")
    out_features = weight.shape[0]
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"small_linear: bias {tuple(bias.shape)}, expected ({out_features},)")
    out = torch.empty(rows, out_features, dtype=torch.float32)
    _native.small_linear_f32(x.data_ptr(), rows, in_features, x.stride(0) if rows > 1 else in_features,
                             weight.data_ptr(), out_features, 0 if bias is None else bias.data_ptr(),
                             out.data_ptr(), out_features, torch.get_num_threads())
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, sent to the native kernel when it applies."""
    if x.dim() == 2 and x.shape[0] <= MAX_NATIVE_ROWS and _fits_kernel(x, weight, bias):
        return small_linear(x, weight, bias)
    return F.linear(x, weight, bias)
