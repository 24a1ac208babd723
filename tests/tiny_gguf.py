"""A tiny model's weights written as a GGUF file, the way llama.cpp's converter writes one (gguf's GGUFWriter)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from tiny_model import CHAT_TEMPLATE


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k rows so that rotary pairs are neighbours."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def matmuls_as(qtype: QT) -> Callable[[str], QT]:
    """Every matmul weight (embedding included) in `qtype`, norms in F32, as llama.cpp's quantizer leaves them."""
    return lambda name: QT.F32 if name.endswith("norm.weight") else qtype


def write_tiny_gguf(model_dir: str | Path, path: Path, types: Callable[[str], QT]) -> Path:
    """The safetensors model in `model_dir` (tests/tiny_model.py) as a llama-architecture GGUF at `path`, each
    Hugging Face tensor stored as types(name)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    specials = {t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for _, i in vocab])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in load_file(model_dir / "model.safetensors").items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, config.num_key_value_heads)
        name, qtype = names.get_name(hf_name, try_suffixes=(".weight", ".bias")), types(hf_name)
        if qtype in (QT.F32, QT.F16):
            writer.add_tensor(name, w.astype(np.float32 if qtype == QT.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
