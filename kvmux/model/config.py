"""A model's architecture as its config.json states it: the fields the Llama and Gemma 3 models read.

Read straight from the JSON rather than through transformers' AutoConfig, whose import alone adds about 80 MB
to a serving process's memory. A field the file leaves out takes the default of transformers' config class
for that model type, so both readings agree (tests/test_model_files.py checks it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# transformers' class defaults where the supported model types differ; every other default is the same for all.
_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "gemma3_text": 131072}
_EOS = {"llama": 2, "mistral": 2, "gemma3_text": 1}
_KV_HEADS = {"mistral": 8, "qwen2": 32, "qwen3": 32, "gemma3_text": 16}  # llama: one KV head per query head
_HEAD_DIM = {"qwen3": 128, "gemma3_text": 256}  # the others: hidden_size / num_attention_heads
_TIED = {"gemma3_text": True}  # the others: untied
_ROPE_THETA = {"gemma3_text": 1_000_000.0}  # the others: 10,000
# Gemma 3's: every `_GEMMA3_PATTERN`th layer attends globally, the others over the last `sliding_window` tokens.
_GEMMA3_PATTERN, _GEMMA3_WINDOW, _GEMMA3_LOCAL_THETA = 6, 4096, 10_000.0
SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer types
_REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope_parameters: dict  # rope_theta, rope_type and the scaling's own keys (transformers 5's `rope_parameters`)
    eos_token_id: int | list[int] | None
    # Gemma 3 (None elsewhere): per layer SLIDING or FULL, the window of a sliding layer in tokens (the query's own
    # and the window - 1 before it), the rope of sliding layers, the query scale's 1 / sqrt(query_pre_attn_scalar).
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    rope_local: dict | None = None
    query_pre_attn_scalar: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ValueError(f"the model's config.json lacks {', '.join(missing)}")
        kind = d["model_type"]
        heads = d["num_attention_heads"]
        gemma = _gemma3_fields(d) if kind == "gemma3_text" else {}
        return cls(
            model_type=kind, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            # An explicit null means one per query head, as transformers' config classes read it.
            num_key_value_heads=(d["num_key_value_heads"] if "num_key_value_heads" in d else _KV_HEADS.get(kind))
            or heads,
            head_dim=d.get("head_dim") or _HEAD_DIM.get(kind, d["hidden_size"] // heads),
            max_position_embeddings=d.get("max_position_embeddings") or _MAX_POSITIONS.get(kind, 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", _TIED.get(kind, False))),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            rope_parameters=gemma.pop("rope_parameters", None) or _rope_parameters(d),
            eos_token_id=d.get("eos_token_id", _EOS.get(kind)), **gemma)

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        return cls.from_dict(json.loads((folder / "config.json").read_text()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rope_parameters(d: dict, theta: float | None = None) -> dict:
    """transformers 5's `rope_parameters`, or the older `rope_scaling` (which wins where both are given, as in
    transformers) with `rope_theta`, in that form."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    params.setdefault("rope_theta", d.get("rope_theta", theta or _ROPE_THETA.get(d["model_type"], 10000.0)))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _gemma3_fields(d: dict) -> dict:
    """Gemma 3's own fields as Gemma3TextConfig reads them: transformers 5 keeps one rope per layer type in
    `rope_parameters`; older files have `rope_theta` (global layers), `rope_scaling` and `rope_local_base_freq`."""
    for capped in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(capped) is not None:
            raise ValueError(f"the model's config.json sets {capped}; kvmux's Gemma 3 has no logit soft-capping "
                             f"(Gemma 2 has it, Gemma 3 does not)")
    if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"Gemma 3 with hidden_activation {d['hidden_activation']!r}: kvmux runs gelu_pytorch_tanh")
    n = d["num_hidden_layers"]
    pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or _GEMMA3_PATTERN
    types = d.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise ValueError(f"the model's layer_types must list {SLIDING!r} or {FULL!r} for each of its {n} layers")
    ropes = d.get("rope_parameters") or {}
    if FULL in ropes or SLIDING in ropes:
        full = _rope_parameters({"model_type": "gemma3_text", "rope_parameters": ropes.get(FULL)})
        local = _rope_parameters({"model_type": "gemma3_text", "rope_parameters": ropes.get(SLIDING)},
                                 _GEMMA3_LOCAL_THETA)
    else:
        full = _rope_parameters(d)
        local = {"rope_theta": d.get("rope_local_base_freq", _GEMMA3_LOCAL_THETA), "rope_type": "default"}
    return {"layer_types": tuple(types), "sliding_window": d.get("sliding_window") or _GEMMA3_WINDOW,
            "rope_parameters": full, "rope_local": local,
            "query_pre_attn_scalar": float(d.get("query_pre_attn_scalar", 256))}
