"""A lean Llama-family model (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3) over a packed batch.

Weights are addressed by Hugging Face's parameter names (`hf_parameters`), so
HF checkpoints load strictly, while q/k/v and gate/up are stored merged so
each runs as one matmul. Parameters are allocated uninitialised: they are
always overwritten by a checkpoint, and random init of a large model costs
seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kvmux import _native
from kvmux.cache.kv_cache import KVCache
from kvmux.model.config import ModelConfig
from kvmux.model.native_stack import NativeStack, float_weights, native_matmuls
from kvmux.ops import fused
from kvmux.ops.attention import BACKENDS, native_available, paged_attention
from kvmux.ops.cpu_attention import attention_variant
from kvmux.ops.linear import Dispatch, ShapePlan, pack_weight, packed_rows, plan_linears
from kvmux.ops.quant import QuantWeight, quant_linear
from kvmux.step.forward_batch import ForwardBatch


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). After `pack()` (CPU models, at load) the weight is held only in the native kernels'
    panel layout, in its own dtype, with a float32 bias and float32 activations; after `set_quantized()`
    only as quantized blocks (`self.quant`, kvmux/ops/quant.py; `self.weight` is then None), or after
    `set_pieces()` as consecutive ranges of its rows, each a Linear of its own with its own blocks. The model's
    `pack_weights` then gives each matmul a `dispatch`: the kernel timed fastest for its shape and weight format
    at each row count (kvmux/ops/linear.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None
        self.packed = False
        self.quant: QuantWeight | None = None
        self.dense: torch.Tensor | None = None  # an [N, K] copy, kept only for a kernel that reads one
        self.dispatch: Dispatch | None = None
        # Row ranges held as separate matmuls, outputs side by side; a plain list, not submodules, so that module
        # walks see this Linear once (`matmuls()` lists what runs).
        self.pieces: list[Linear] | None = None

    @property
    def weight_format(self) -> str:
        """What its kernels take: the quantized type (q8_0, q4_0, q4_1) or the float weight's dtype."""
        return self.quant.qtype if self.quant is not None else str(self.weight.dtype).removeprefix("torch.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pieces is not None:
            y = torch.cat([piece(x) for piece in self.pieces], dim=-1)
            return y if self.bias is None else y + self.bias
        if self.dispatch is not None:
            return self.dispatch(x)
        if self.quant is not None:
            return quant_linear(x, self.quant, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _float_bias(self) -> None:
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().float(), requires_grad=False)

    def pack(self) -> None:
        if self.quant is not None or self.pieces is not None:
            return  # already in its kernels' forms
        self.weight = nn.Parameter(pack_weight(self.weight.detach()), requires_grad=False)
        self._float_bias()
        self.packed = True

    def set_quantized(self, weight: QuantWeight) -> None:
        """Hold the weight only as `weight`'s blocks from now on (CPU models; the float weight is dropped)."""
        if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight [{weight.out_features}, {weight.in_features}] for a linear of "
                             f"[{self.out_features}, {self.in_features}]")
        self.weight, self.quant = None, weight
        self._float_bias()
        self.packed = True

    def set_pieces(self, weights: list[QuantWeight]) -> None:
        """Hold the weight as these blocks' rows, one after the other, each multiplied on its own (parts of a
        merged matmul whose quantized types share no form; the float weight is dropped)."""
        if sum(w.out_features for w in weights) != self.out_features:
            raise ValueError(f"pieces of {[w.out_features for w in weights]} rows for a linear of "
                             f"{self.out_features}")
        self.pieces = []
        for weight in weights:
            piece = Linear(self.in_features, weight.out_features, False, self.weight.dtype, "meta")
            piece.set_quantized(weight)
            self.pieces.append(piece)
        self.weight = None
        self._float_bias()
        self.packed = True

    def matmuls(self) -> list[Linear]:
        """What runs for it: itself, or its pieces."""
        return [self] if self.pieces is None else self.pieces

    def weight_bytes(self) -> int:
        if self.pieces is not None:
            return sum(piece.weight_bytes() for piece in self.pieces)
        return self.quant.nbytes if self.quant is not None else self.weight.numel() * self.weight.element_size()

    def dense_weight(self) -> torch.Tensor:
        """The weight as [out, in]: the parameter itself, or a copy rebuilt from the packed panels or blocks."""
        if self.pieces is not None:
            return torch.cat([piece.dense_weight() for piece in self.pieces])
        if self.quant is not None:
            return self.quant.dequantize()
        if self.packed:
            return packed_rows(self.weight, torch.arange(self.out_features), self.in_features)
        return self.weight


class MergedLinear(Linear):
    """Several HF linears over the same input, stored as one weight (one matmul)."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(in_features, sum(parts.values()), bias, dtype, device)
        self.parts = parts  # HF sub-module name -> its output features, in storage order

    def hf_views(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name relative to the parent, view into the merged storage) per original parameter."""
        start, weight = 0, self.dense_weight()
        for name, size in self.parts.items():
            yield f"{name}.weight", weight[start:start + size]
            if self.bias is not None:
                yield f"{name}.bias", self.bias[start:start + size]
            start += size


class Embedding(Linear):
    """Token embeddings [vocab, hidden]; as a Linear from hidden to vocab it is also a tied lm_head."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(hidden, vocab, False, dtype, device)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.rows(ids)
        if self.packed:
            return packed_rows(self.weight, ids, self.in_features).float()
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = _param(dim, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)

    def pack(self) -> None:
        """Its weight in float32, as packed models' activations are (CPU models, at load)."""
        self.weight = nn.Parameter(self.weight.detach().float(), requires_grad=False)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add folded into the norm."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig, head_dim: int, params: dict | None = None) -> torch.Tensor:
    """The rotary frequencies of `params` (None: the config's rope_parameters)."""
    params = params or config.rope_parameters
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":  # positions slowed by `factor` (Gemma 3's global layers from 4B up)
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context = params.get("original_max_position_embeddings", config.max_position_embeddings)
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
        # and the band between interpolates smoothly between the two.
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low_freq_factor, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high_freq_factor) & (wavelen <= old_context / low_freq_factor)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only 'default', 'linear' and 'llama3')")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.splits = (q_size, kv_size, kv_size)

        # Qwen2 always has q/k/v biases (and none on o_proj); in Llama-style
        # configs `attention_bias` puts a bias on all four.
        attention_bias = config.attention_bias
        qkv_bias = attention_bias or config.model_type == "qwen2"
        self.qkv_proj = MergedLinear(hidden, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     qkv_bias, dtype, device)
        self.o_proj = Linear(q_size, hidden, attention_bias and config.model_type != "qwen2", dtype, device)
        self.q_norm = self.k_norm = None
        if config.model_type == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                kv_cache: KVCache, backend: str) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k sit side by side in each row of qkv, so one in-place pass rotates both.
        rotated = self.q_norm is None and fused.rope_inplace(qkv, self.num_heads + self.num_kv_heads,
                                                             self.head_dim, cos, sin)
        q, k, v = qkv.split(self.splits, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if not rotated:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = fused.apply_rope(q, cos, sin), fused.apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, self.layer_idx, batch, self.scale, backend)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        inter = config.intermediate_size
        bias = config.mlp_bias
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate_proj": inter, "up_proj": inter},
                                         bias, dtype, device)
        self.down_proj = Linear(inter, config.hidden_size, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device | str,
                 collectives=None) -> None:
        super().__init__()
        self.collectives = collectives  # tensor parallel: sums the row-parallel projections' partial outputs
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, dtype, device)

    def native_layer(self) -> _native.DecoderLayer | None:
        """This layer for the native stack (kvmux/model/native_stack.py), or None where it cannot run there."""
        attn, mlp = self.self_attn, self.mlp
        norms = self.input_layernorm, self.post_attention_layernorm
        if self.collectives is not None or attn.q_norm is not None or not float_weights(*(n.weight for n in norms)):
            return None
        matmuls = native_matmuls(attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if matmuls is None:
            return None
        return _native.DecoderLayer(norms[0].weight.data_ptr(), norms[0].eps, norms[1].weight.data_ptr(),
                                    norms[1].eps, *matmuls, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                    mlp.down_proj.in_features, attn.scale, attn.layer_idx)

    def forward(self, x, residual, cos, sin, batch, kv_cache, backend):
        """Returns (this layer's MLP output, the residual stream before it); their sum is the layer's output."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, batch, kv_cache, backend)
        if self.collectives is not None:
            self.collectives.all_reduce(h)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        h = self.mlp(h)
        if self.collectives is not None:
            self.collectives.all_reduce(h)
        return h, residual


class Backbone(nn.Module):
    """HF's `model.` sub-tree: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str, collectives=None,
                 layer=DecoderLayer, norm=RMSNorm) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(layer(config, i, dtype, device, collectives)
                                    for i in range(config.num_hidden_layers))
        self.norm = norm(config.hidden_size, config.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    """The Llama family's causal LM; also the base of the other families' (kvmux/model/gemma3.py), which share its
    loading, packing and kernel planning and bring their own layers and forward."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    decoder_layer, norm = DecoderLayer, RMSNorm

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attention_backend: str = "auto", collectives=None) -> None:
        """collectives: a tensor-parallel rank's (kvmux/parallel/collectives.py), for a model built from its
        rank_config and loaded with its slices; None for the whole model."""
        super().__init__()
        if config.model_type not in self.model_types:
            raise ValueError(f"{type(self).__name__} runs model types {', '.join(self.model_types)}, "
                             f"not {config.model_type!r}")
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, not {attention_backend!r}")
        self.config = config
        self._dtype = dtype
        self.attention_backend = attention_backend
        self.collectives = collectives
        self.model = Backbone(config, dtype, device, collectives, self.decoder_layer, self.norm)
        self.tie_word_embeddings = config.tie_word_embeddings
        self.lm_head = None if self.tie_word_embeddings else \
            Linear(config.hidden_size, config.vocab_size, False, dtype, device)
        attn = self.model.layers[0].self_attn
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.register_buffer("inv_freq", rope_inv_freq(config, attn.head_dim).to(device), persistent=False)
        self.kernel_plans: list[ShapePlan] = []  # per matmul shape, once packed
        self.native_stack: NativeStack | None = None  # the layers in one native call per step, once packed

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model was built in: its float weights' and its KV cache's."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    def hf_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter under its Hugging Face name; merged weights appear as views of their parts.
        Once packed, matmul weights come back as [out, in] copies rebuilt from their panels or blocks."""
        out = {}
        for prefix, module in self.named_modules():
            if isinstance(module, MergedLinear):
                parent = prefix.rpartition(".")[0]
                for name, view in module.hf_views():
                    out[f"{parent}.{name}"] = view
                continue
            for name, param in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}" if prefix else name] = param
            if isinstance(module, Linear):
                out[f"{prefix}.weight"] = module.dense_weight()
        return out

    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (HF name, tensor) pairs in, strictly: unknown, duplicate or missing names raise.

        A tied checkpoint may still carry `lm_head.weight` (HF state dicts do);
        it is the embedding itself, so it is skipped.
        """
        if self.packed:
            raise RuntimeError("the weights are already packed for the native kernel; load before pack_weights()")
        params = self.hf_parameters()
        missing = set(params)
        for name, tensor in weights:
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if name not in missing:
                raise KeyError(f"unexpected or duplicate weight {name!r}")
            dst = params[name]
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: checkpoint shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
            missing.discard(name)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:5]}")

    @property
    def packed(self) -> bool:
        return self.model.embed_tokens.packed

    def pack_weights(self) -> None:
        """Rewrite every matmul weight, in place of the original, into the native kernels' panels and time
        the kernels for each shape (CPU only; see kvmux/ops/linear.py); `kernel_plans` says what was chosen.
        From then on activations are float32 whatever the weights' dtype, so norm weights become float32 too.
        After it the model no longer loads checkpoints."""
        if self.device.type != "cpu":
            raise ValueError(f"pack_weights: only CPU models are packed, not one on {self.device}")
        linears = []
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
                linears += module.matmuls()
            elif isinstance(module, RMSNorm):
                module.pack()
        self.kernel_plans = plan_linears(linears)
        self.native_stack = NativeStack.build(self)

    def kernel_choices(self) -> dict:
        """What runs each op here: per matmul shape, the kernel for each row range (and what each candidate
        measured), and the attention kernel (over a KV pool of the model's dtype)."""
        attention = self.attention_backend
        if attention != "torch" and self.device.type == "cpu" and native_available(self.device):
            attention = attention_variant(self.dtype, self.head_dim)
        return {"linear": [plan.describe() for plan in self.kernel_plans], "attention": attention,
                "native_stack": self.native_stack is not None}

    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor | None:
        """Run the step; returns float32 logits [K, vocab] for `batch.logits_indices` (under tensor
        parallelism on model rank 0, and None on the other ranks)."""
        embed = self.model.embed_tokens
        if self.collectives is None:
            x = embed.lookup(batch.input_ids)
        else:
            x = self.collectives.embed(embed.lookup, batch.input_ids)
        cos, sin = fused.rope_tables(batch.positions, self.inv_freq, x.dtype)
        if self.native_stack is not None:
            x, residual = self.native_stack.run(x, cos, sin, batch, kv_cache)
        else:
            residual = None
            for layer in self.model.layers:
                x, residual = layer(x, residual, cos, sin, batch, kv_cache, self.attention_backend)
        # The final norm is per token, so only the rows that need logits go through it and lm_head. Where every
        # row needs them (a decode step: logits_indices, increasing, is then 0..T-1) they are taken as they are.
        rows = batch.logits_indices
        if len(rows) == len(x):
            x, _ = self.model.norm.add_forward(x, residual)
        else:
            x = self.model.norm(x[rows] + residual[rows])
        logits = (embed if self.lm_head is None else self.lm_head)(x).float()
        return logits if self.collectives is None else self.collectives.gather_logits(logits)
