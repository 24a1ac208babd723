"""Model implementations and loading."""

from kvmux.model.llama import LlamaForCausalLM
from kvmux.model.loader import LoadedModel, load_model

__all__ = ["LlamaForCausalLM", "LoadedModel", "load_model"]
