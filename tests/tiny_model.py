"""Tiny random-weight Hugging Face models (with a matching tokenizer) for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
          "jolly kvmux blocks pages tokens cache prefix share copy write swap evict "
          "hello world engine decode prefill batch stream request model attention").split()

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tiny_tokenizer(vocab: int):
    """A byte-level BPE tokenizer of exactly `vocab` ids, so any id a model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # A deterministic pseudo-random word stream gives the trainer plenty of merges.
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(_WORDS), (4000,), generator=g).tolist()
    text = [" ".join(_WORDS[i] for i in idx[j:j + 20]) for j in range(0, len(idx), 20)]
    tok.train_from_iterator(text, trainer)
    if tok.get_vocab_size() != vocab:
        raise ValueError(f"tiny tokenizer came out with {tok.get_vocab_size()} ids, wanted {vocab}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_config(*, num_kv_heads: int = 2, tie: bool = True, rope_scaling: dict | None = None,
                model_type: str = "llama", vocab: int = 320, num_layers: int = 2, window: int = 10):
    """A small config of the given family: hidden 64, 4 heads of 16, intermediate 128 (Gemma 3: a sliding
    `window`)."""
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "gemma3_text": "Gemma3TextConfig"}
    rope = {"rope_type": "default", "rope_theta": 10000.0, **(rope_scaling or {})}
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  rope_parameters=rope, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if model_type == "gemma3_text":
        # Gemma 3's pattern (every third layer global here, every sixth in the real ones) with a window of a
        # few blocks, so that short prompts already run past it; ropes of their own per layer type.
        types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)]
        kwargs.update(layer_types=types, sliding_window=window, query_pre_attn_scalar=24,
                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return getattr(transformers, classes[model_type])(**kwargs)


def make_tiny_model(path: str | Path, *, num_kv_heads: int = 2, tie: bool = True,
                    rope_scaling: dict | None = None, model_type: str = "llama", vocab: int = 320,
                    num_layers: int = 2, seed: int = 0, window: int = 10) -> Path:
    """Save a random-weight HF model plus tokenizer to `path` (a loadable safetensors folder)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = tiny_config(num_kv_heads=num_kv_heads, tie=tie, rope_scaling=rope_scaling,
                         model_type=model_type, vocab=vocab, num_layers=num_layers, window=window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Default init leaves norms at 1 and biases at 0, which would hide bugs in
    # how those weights are loaded; perturb every parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    make_tiny_tokenizer(vocab).save_pretrained(path)
    return path
