"""The Llama family's decoder layers as one native call per step (native/cpu/decoder_stack.h).

At a decode step's few rows the Python between a layer's nine kernels cost more than the kernels; the native
stack runs the same kernels, chosen by the same plan, in the same order, so its outputs equal the Python
layers' bit for bit (tests/test_native_stack.py). A packed CPU model gets one where every layer can take it:
no tensor parallelism, no q/k norms (Qwen3), every matmul a native kernel (not oneDNN), native attention.
Everything else runs the Python layers, which stay the reference.
"""

from __future__ import annotations

import torch

from kvmux import _native
from kvmux.cache.kv_cache import KVCache
from kvmux.ops.cpu_attention import CpuMetadata
from kvmux.ops.tensor_checks import DTYPE_CODES, check_k_mean, check_pool
from kvmux.ops.threads import threads
from kvmux.step.forward_batch import ForwardBatch


def _matmul(linear) -> _native.LayerMatmul | None:
    """A Linear's native form: each piece's calls per row range, and the bias the pieces leave to the end."""
    pieces = []
    for piece in linear.matmuls():
        calls = None if piece.dispatch is None else piece.dispatch.native_calls()
        if calls is None:
            return None
        pieces.append((piece.dispatch.bounds, calls, piece.out_features))
    bias = linear.bias.data_ptr() if linear.pieces is not None and linear.bias is not None else 0
    return _native.LayerMatmul(pieces, bias, linear.out_features, linear.in_features)


def _layer(layer) -> _native.DecoderLayer | None:
    attn, mlp = layer.self_attn, layer.mlp
    if layer.collectives is not None or attn.q_norm is not None:
        return None
    matmuls = [_matmul(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(m is None for m in matmuls):
        return None
    norms = layer.input_layernorm, layer.post_attention_layernorm
    if any(n.weight.dtype != torch.float32 or not n.weight.is_contiguous() for n in norms):
        return None
    return _native.DecoderLayer(norms[0].weight.data_ptr(), norms[0].eps, norms[1].weight.data_ptr(),
                                norms[1].eps, *matmuls, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                mlp.down_proj.in_features, attn.scale, attn.layer_idx)


class NativeStack:
    """A packed model's decoder layers in native code; `build` gives None where a layer cannot run there. It
    holds the model's weights by address: the model must outlive it."""

    def __init__(self, layers: list[_native.DecoderLayer], hidden: int, widths: tuple[int, int, int, int],
                 kv_heads: int, head_dim: int) -> None:
        self.stack = _native.DecoderStack(layers)
        self.hidden = hidden
        self.widths = widths  # q|k|v, attention's output, gate|up, intermediate
        self.kv_heads, self.head_dim, self.last_layer = kv_heads, head_dim, len(layers) - 1

    @classmethod
    def build(cls, model) -> NativeStack | None:
        if model.device.type != "cpu" or model.attention_backend == "torch":
            return None
        layers = [_layer(layer) for layer in model.model.layers]
        if any(layer is None for layer in layers):
            return None
        first = model.model.layers[0]
        attn, mlp = first.self_attn, first.mlp
        widths = (attn.qkv_proj.out_features, attn.num_heads * attn.head_dim, mlp.gate_up_proj.out_features,
                  mlp.down_proj.in_features)
        return cls(layers, model.config.hidden_size, widths, attn.num_kv_heads, attn.head_dim)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
            kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer over x [rows, hidden] float32 (changed in place): (the last MLP output, the residual)."""
        meta = batch.attn_metadata
        if not isinstance(meta, CpuMetadata):
            meta = batch.attn_metadata = CpuMetadata(batch, kv_cache)
        rows = x.shape[0]
        if rows != meta.native.num_tokens or x.dtype != torch.float32 or x.shape[1] != self.hidden:
            raise ValueError(f"native stack: x {x.dtype} {tuple(x.shape)} for a step of {meta.native.num_tokens} "
                             f"tokens of {self.hidden} float32")
        check_pool(kv_cache, self.kv_heads, self.head_dim, self.last_layer)
        x = x.clone(memory_format=torch.contiguous_format)  # written in place; the lookup's tensor stays as it was
        residual = torch.empty_like(x)
        scratch = [torch.empty(rows, w, dtype=torch.float32) for w in (self.hidden, *self.widths)]
        k_mean = check_k_mean(kv_cache, self.last_layer)
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        self.stack.run(x.data_ptr(), residual.data_ptr(), rows, self.hidden, cos.data_ptr(), sin.data_ptr(),
                       meta.native, meta.kernel, meta.num_threads, kv_cache.kv.data_ptr(),
                       DTYPE_CODES[kv_cache.dtype], kv_cache.num_blocks, kv_cache.num_layers, kv_cache.block_size,
                       0 if k_mean is None else k_mean.data_ptr(), *(t.data_ptr() for t in scratch), threads())
        return x, residual
