"""Gemma 3 (its text model, `gemma3_text`) over the packed batch, on the Llama family's linears and loading.

What differs from Llama, as transformers' Gemma3ForCausalLM computes it:
- the token embeddings are scaled by sqrt(hidden_size) (rounded to the model's dtype first);
- RMSNorm scales by 1 + weight, and there are four per layer: before and after attention, before and after the
  MLP (each output normalised before it joins the residual stream); q and k are normalised per head too;
- the MLP's activation is GELU (tanh approximation) rather than SiLU;
- queries are scaled by query_pre_attn_scalar^-1/2 rather than head_dim^-1/2;
- layers alternate: `sliding_attention` layers see the last `sliding_window` tokens and rotate with their own
  rope base (10,000), every sixth layer (`full_attention`) sees the whole context with the global rope.
"""

from __future__ import annotations

import torch
from torch import nn

from kvmux import _native
from kvmux.cache.kv_cache import KVCache
from kvmux.model.config import SLIDING, ModelConfig
from kvmux.model.llama import Linear, LlamaForCausalLM, MergedLinear, RMSNorm, rope_inv_freq
from kvmux.model.native_stack import float_weights, native_matmuls
from kvmux.ops import fused
from kvmux.ops.attention import paged_attention
from kvmux.step.forward_batch import ForwardBatch


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight): Gemma's checkpoints store the weight without its 1."""

    multiplier: torch.Tensor | None = None  # 1 + weight, once the weight is final (pack): 436 norms a step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight.float() + 1 if self.multiplier is None else self.multiplier, self.eps)

    def pack(self) -> None:
        super().pack()
        self.multiplier = self.weight.detach() + 1


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.sliding = config.layer_types[layer_idx] == SLIDING
        self.window = config.sliding_window if self.sliding else 0
        # Where the sliding layers have a pool of their own: this layer's place among the layers of its pool.
        self.pool_layer = sum((t == SLIDING) == self.sliding for t in config.layer_types[:layer_idx])
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.splits = (q_size, kv_size, kv_size)
        bias = config.attention_bias
        self.qkv_proj = MergedLinear(hidden, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     bias, dtype, device)
        self.o_proj = Linear(q_size, hidden, bias, dtype, device)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                kv_cache: KVCache, backend: str) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k sit side by side in each row of qkv: normed and rotated in place, one pass each (as the native
        # stack does), where the native kernels apply.
        normed = fused.norm_rope_inplace(qkv, self.num_heads, self.num_kv_heads, self.head_dim,
                                         (self.q_norm.multiplier, self.q_norm.eps),
                                         (self.k_norm.multiplier, self.k_norm.eps), cos, sin)
        q, k, v = qkv.split(self.splits, dim=-1)
        if normed:
            q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
            q, k = fused.apply_rope(q, cos, sin), fused.apply_rope(k, cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if kv_cache.sliding is None:
            pool, pool_batch, layer = kv_cache, batch, self.layer_idx
        else:
            pool, pool_batch = (kv_cache.sliding, batch.sliding) if self.sliding else (kv_cache, batch)
            layer = self.pool_layer
        out = paged_attention(q, k, v, pool, layer, pool_batch, self.scale, backend, self.window)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class Gemma3MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate_proj": inter, "up_proj": inter}, False,
                                         dtype, device)
        self.down_proj = Linear(inter, config.hidden_size, False, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.gelu_tanh_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device | str,
                 collectives=None) -> None:
        super().__init__()
        self.collectives = collectives  # tensor parallel: sums the row-parallel projections' partial outputs
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps, dtype, device)
        self.self_attn = Gemma3Attention(config, layer_idx, dtype, device)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps, dtype, device)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype, device)
        self.mlp = Gemma3MLP(config, dtype, device)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype, device)

    def native_layer(self) -> _native.DecoderLayer | None:
        """This layer for the native stack (kvmux/model/native_stack.py), or None where it cannot run there."""
        attn, mlp = self.self_attn, self.mlp
        norms = (self.input_layernorm, self.post_attention_layernorm, attn.q_norm, attn.k_norm,
                 self.pre_feedforward_layernorm, self.post_feedforward_layernorm)
        if self.collectives is not None or not float_weights(*(n.multiplier for n in norms)):
            return None
        matmuls = native_matmuls(attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if matmuls is None:
            return None
        ptrs = [(n.multiplier.data_ptr(), n.eps) for n in norms]
        gemma = _native.GemmaParts(*ptrs[2], *ptrs[3], *ptrs[4], *ptrs[5], attn.window, attn.pool_layer)
        return _native.DecoderLayer(*ptrs[0], *ptrs[1], *matmuls, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                    mlp.down_proj.in_features, attn.scale, attn.layer_idx, gemma)

    def forward(self, x: torch.Tensor, ropes: dict[bool, tuple[torch.Tensor, torch.Tensor]], batch: ForwardBatch,
                kv_cache: KVCache, backend: str) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), *ropes[self.self_attn.sliding], batch, kv_cache, backend)
        if self.collectives is not None:
            self.collectives.all_reduce(h)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.collectives is not None:
            self.collectives.all_reduce(h)
        return x + self.post_feedforward_layernorm(h)


class Gemma3ForCausalLM(LlamaForCausalLM):
    model_types = ("gemma3_text",)
    decoder_layer, norm = Gemma3DecoderLayer, GemmaRMSNorm

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attention_backend: str = "auto", collectives=None) -> None:
        super().__init__(config, dtype, device, attention_backend, collectives)
        self.register_buffer("inv_freq_local", rope_inv_freq(config, self.head_dim, config.rope_local).to(device),
                             persistent=False)
        # transformers multiplies in the weights' dtype: sqrt(640) is 25.25 in bfloat16.
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5, dtype=dtype))

    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor | None:
        embed = self.model.embed_tokens
        lookup = lambda ids: embed.lookup(ids) * self.embed_scale  # noqa: E731
        x = lookup(batch.input_ids) if self.collectives is None else self.collectives.embed(lookup, batch.input_ids)
        ropes = {sliding: fused.rope_tables(batch.positions, inv_freq, x.dtype)
                 for sliding, inv_freq in ((False, self.inv_freq), (True, self.inv_freq_local))}
        if self.native_stack is not None:
            x, _ = self.native_stack.run(x, *ropes[False], batch, kv_cache, local=ropes[True])
        else:
            for layer in self.model.layers:
                x = layer(x, ropes, batch, kv_cache, self.attention_backend)
        x = self.model.norm(x[batch.logits_indices])
        logits = (embed if self.lm_head is None else self.lm_head)(x).float()
        return logits if self.collectives is None else self.collectives.gather_logits(logits)
