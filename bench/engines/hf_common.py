"""Loading the transformers baselines: the same weights and dtype kvmux runs."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def load(folder: str, dtype: str, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs)
    return model.eval()
