"""A model's architecture as its config.json states it: the fields the Llama-family model reads.

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
_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
_EOS = {"llama": 2, "mistral": 2}
_KV_HEADS = {"mistral": 8, "qwen2": 32, "qwen3": 32}  # llama: one KV head per query head
_HEAD_DIM = {"qwen3": 128}  # the others: hidden_size / num_attention_heads
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

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ValueError(f"the model's config.json lacks {', '.join(missing)}")
        kind = d["model_type"]
        heads = d["num_attention_heads"]
        return cls(
            model_type=kind, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            # An explicit null means one per query head, as transformers' config classes read it.
            num_key_value_heads=(d["num_key_value_heads"] if "num_key_value_heads" in d else _KV_HEADS.get(kind))
            or heads,
            head_dim=d.get("head_dim") or _HEAD_DIM.get(kind, d["hidden_size"] // heads),
            max_position_embeddings=d.get("max_position_embeddings") or _MAX_POSITIONS.get(kind, 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            rope_parameters=_rope_parameters(d), eos_token_id=d.get("eos_token_id", _EOS.get(kind)))

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        return cls.from_dict(json.loads((folder / "config.json").read_text()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rope_parameters(d: dict) -> dict:
    """transformers 5's `rope_parameters`, or the older `rope_scaling` (which wins where both are given, as in
    transformers) with `rope_theta`, in that form."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params
