"""A Llama or Gemma 3 layer's element-wise steps: native fused kernels for float32 on the CPU, torch otherwise.

Torch runs each of RMSNorm's, rotary embedding's and the gated MLP's operators as its
own pass over the activations with its own dispatch, about twenty per layer;
the fused kernels make one pass each. Every function here keeps the torch
formulation as the fallback (and as the reference the tests compare against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmux import _native
from kvmux.ops.threads import threads


def _native_rows(*tensors: torch.Tensor) -> bool:
    """float32 CPU matrices whose rows are contiguous (the kernels take a row stride)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 and t.stride(1) == 1
               for t in tensors)


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 like the reference, whatever the weight dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _native_rows(x) and weight.dtype == torch.float32 and weight.is_contiguous():
        out = torch.empty(x.shape, dtype=torch.float32)
        _native.rms_norm_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), weight.data_ptr(), eps,
                             out.data_ptr(), threads())
        return out
    return _torch_rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x); the native path updates `residual` in place."""
    if (_native_rows(x, residual) and x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
            and weight.dtype == torch.float32 and weight.is_contiguous()):
        out = torch.empty(x.shape, dtype=torch.float32)
        _native.add_rms_norm_f32(x.data_ptr(), residual.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(),
                                 eps, out.data_ptr(), threads())
        return out, residual
    residual = residual + x
    return _torch_rms_norm(residual, weight, eps), residual


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim / 2] of each token's position times each frequency."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    return freqs.cos().to(dtype).contiguous(), freqs.sin().to(dtype).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated in Hugging Face's half-split layout; cos/sin [T, D / 2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def _rope_applies(rows: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the native rotation takes these: float32 rows wide enough for `heads` heads, contiguous tables."""
    return (_native_rows(rows, cos, sin) and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape == sin.shape == (rows.shape[0], head_dim // 2) and head_dim % 2 == 0
            and rows.shape[1] >= heads * head_dim)


def rope_inplace(rows: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate the first `heads` heads of each row of `rows` [T, >= heads * head_dim] in place, natively.

    Returns False (and leaves `rows` alone) where the native kernel does not apply.
    """
    if not _rope_applies(rows, heads, head_dim, cos, sin):
        return False
    _native.rope_f32(rows.data_ptr(), rows.shape[0], rows.stride(0), heads, head_dim, cos.data_ptr(),
                     sin.data_ptr(), threads())
    return True


def norm_rope_inplace(rows: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                      q_norm: tuple[torch.Tensor | None, float], k_norm: tuple[torch.Tensor | None, float],
                      cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """RMSNorm per head of q's `heads` heads and then of k's `kv_heads` (each norm a (weight, eps)), then their
    rotation, in place in each row of rows [T, >= (heads + kv_heads) * head_dim], natively (Gemma 3's attention).

    Returns False (and leaves `rows` alone) where the native kernels do not apply.
    """
    if not (_rope_applies(rows, heads + kv_heads, head_dim, cos, sin)
            and all(w is not None and w.dtype == torch.float32 and w.is_contiguous() and w.numel() == head_dim
                    for w, _ in (q_norm, k_norm))):
        return False
    for first, count, (weight, eps) in ((0, heads, q_norm), (heads, kv_heads, k_norm)):
        _native.head_rms_norm_f32(rows.data_ptr() + first * head_dim * rows.element_size(), rows.shape[0],
                                  rows.stride(0), count, head_dim, weight.data_ptr(), eps, threads())
    return rope_inplace(rows, heads + kv_heads, head_dim, cos, sin)  # applies: checked above


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    return _gated(gate_up, _native.silu_mul_f32, F.silu)


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, tanh approximation) * up for gate_up = [gate | up] along the last dimension (Gemma's MLP)."""
    return _gated(gate_up, _native.gelu_tanh_mul_f32, lambda gate: F.gelu(gate, approximate="tanh"))


def _gated(gate_up: torch.Tensor, native, act) -> torch.Tensor:
    """act(gate) * up: the native kernel where it applies, else torch's act."""
    if _native_rows(gate_up) and gate_up.is_contiguous() and gate_up.shape[1] % 2 == 0:
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=torch.float32)
        native(gate_up.data_ptr(), rows, inter, out.data_ptr(), threads())
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
