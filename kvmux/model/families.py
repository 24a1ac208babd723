"""Which model class runs a config's model_type."""

from __future__ import annotations

from kvmux.model.config import ModelConfig
from kvmux.model.gemma3 import Gemma3ForCausalLM
from kvmux.model.llama import LlamaForCausalLM

MODEL_CLASSES = {kind: cls for cls in (LlamaForCausalLM, Gemma3ForCausalLM) for kind in cls.model_types}


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    try:
        return MODEL_CLASSES[config.model_type]
    except KeyError:
        hint = " (the multimodal Gemma 3; kvmux runs its text model, gemma3_text)" \
            if config.model_type == "gemma3" else ""
        raise ValueError(f"model_type {config.model_type!r}{hint} is not supported; "
                         f"supported: {', '.join(MODEL_CLASSES)}") from None
