"""A model's decoder layers as one native call per step (native/cpu/decoder_stack.h): the Llama family's and Gemma
3's.

At a decode step's few rows the Python between a layer's nine kernels cost more than the kernels; the native
stack runs the same kernels, chosen by the same plan, in the same order, so its outputs equal the Python
layers' bit for bit (tests/test_native_stack.py). A packed CPU model gets one where every layer can take it
(each layer class says so, `native_layer`): no tensor parallelism, no Qwen3 q/k norms, every matmul a native
kernel (not oneDNN), native attention. Everything else runs the Python layers, which stay the reference.
"""

from __future__ import annotations

import torch

from kvmux import _native
from kvmux.cache.kv_cache import KVCache
from kvmux.model.config import SLIDING
from kvmux.ops.cpu_attention import CpuMetadata
from kvmux.ops.tensor_checks import DTYPE_CODES, check_k_mean, check_pool
from kvmux.ops.threads import threads
from kvmux.step.forward_batch import ForwardBatch


def native_matmuls(*linears) -> list[_native.LayerMatmul] | None:
    """Each Linear's native form (its pieces' calls per row range, and the bias they leave to the end); None
    where one has none."""
    out = []
    for linear in linears:
        pieces = []
        for piece in linear.matmuls():
            calls = None if piece.dispatch is None else piece.dispatch.native_calls()
            if calls is None:
                return None
            pieces.append((piece.dispatch.bounds, calls, piece.out_features))
        bias = linear.bias.data_ptr() if linear.pieces is not None and linear.bias is not None else 0
        out.append(_native.LayerMatmul(pieces, bias, linear.out_features, linear.in_features))
    return out


def float_weights(*weights: torch.Tensor | None) -> bool:
    """Whether norm weights can be read by address as float32 vectors."""
    return all(w is not None and w.dtype == torch.float32 and w.is_contiguous() for w in weights)


class NativeStack:
    """A packed model's decoder layers in native code; `build` gives None where a layer cannot run there. It
    holds the model's weights by address: the model must outlive it."""

    @classmethod
    def build(cls, model) -> NativeStack | None:
        if model.device.type != "cpu" or model.attention_backend == "torch":
            return None
        layers = [layer.native_layer() for layer in model.model.layers]
        if any(layer is None for layer in layers):
            return None
        first = model.model.layers[0]
        attn, mlp = first.self_attn, first.mlp
        widths = (attn.qkv_proj.out_features, attn.num_heads * attn.head_dim, mlp.gate_up_proj.out_features,
                  mlp.down_proj.in_features)
        sliding = sum(t == SLIDING for t in model.config.layer_types or ())
        return cls(layers, model.config.hidden_size, widths, attn.num_kv_heads, attn.head_dim, sliding)

    def __init__(self, layers: list[_native.DecoderLayer], hidden: int, widths: tuple[int, int, int, int],
                 kv_heads: int, head_dim: int, num_sliding: int = 0) -> None:
        self.stack = _native.DecoderStack(layers)
        self.hidden = hidden
        self.widths = widths  # q|k|v, attention's output, gate|up, intermediate
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.num_layers, self.num_sliding = len(layers), num_sliding  # of them, sliding-window layers (Gemma 3)

    def _pool(self, kv_cache: KVCache, batch: ForwardBatch, num_layers: int) -> _native.StackPool:
        """The pool's view for the stack, checked as the Python layers' attention checks it, with the step's
        metadata over it (kept on the batch, as the Python layers keep theirs)."""
        meta = batch.attn_metadata
        if not isinstance(meta, CpuMetadata):
            meta = batch.attn_metadata = CpuMetadata(batch, kv_cache)
        check_pool(kv_cache, self.kv_heads, self.head_dim, num_layers - 1)
        k_mean = check_k_mean(kv_cache, num_layers - 1)
        return _native.StackPool(meta.native, kv_cache.kv.data_ptr(), DTYPE_CODES[kv_cache.dtype],
                                 kv_cache.num_blocks, kv_cache.num_layers, kv_cache.block_size,
                                 0 if k_mean is None else k_mean.data_ptr())

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, kv_cache: KVCache,
            local: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer over x [rows, hidden] float32: the Llama family's (the last MLP output, the residual), Gemma
        3's (the residual stream, an unwritten tensor). local: the sliding-window layers' cos and sin (Gemma 3)."""
        split = kv_cache.sliding is not None
        pool = self._pool(kv_cache, batch, self.num_layers - self.num_sliding if split else self.num_layers)
        sliding = self._pool(kv_cache.sliding, batch.sliding, self.num_sliding) if split else None
        meta = batch.attn_metadata
        rows = x.shape[0]
        if rows != meta.native.num_tokens or x.dtype != torch.float32 or x.shape[1] != self.hidden:
            raise ValueError(f"native stack: x {x.dtype} {tuple(x.shape)} for a step of {meta.native.num_tokens} "
                             f"tokens of {self.hidden} float32")
        x = x.clone(memory_format=torch.contiguous_format)  # written in place; the lookup's tensor stays as it was
        residual = torch.empty_like(x)
        scratch = [torch.empty(rows, w, dtype=torch.float32) for w in (self.hidden, *self.widths, self.hidden)]
        ropes = [t.float().contiguous() for t in (cos, sin, *(local or ()))]
        cos_local, sin_local = (ropes[2].data_ptr(), ropes[3].data_ptr()) if local else (0, 0)
        self.stack.run(x.data_ptr(), residual.data_ptr(), rows, self.hidden, ropes[0].data_ptr(), ropes[1].data_ptr(),
                       cos_local, sin_local, pool, sliding, meta.kernel, meta.num_threads,
                       *(t.data_ptr() for t in scratch), threads())
        return x, residual
