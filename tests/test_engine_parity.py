"""Greedy outputs are token-for-token those of transformers' generate, however the engine batches them."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_helpers import greedy, hf_greedy, run_engine
from tiny_model import make_tiny_model

MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("parity") / "m", num_kv_heads=2))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in (1, 3, 7, 8, 9, 15, 16, 17, 30, 41, 57, 64)]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    return hf_greedy(model, prompts, MAX_NEW)


def check(done, reference):
    for c, want in zip(done, reference):
        assert c.finish_reason == "length"
        assert c.token_ids == want


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_many_prompts_at_once(tiny, prompts, reference, backend):
    done, stats = run_engine(tiny, prompts, greedy(MAX_NEW), num_blocks=256, block_size=8, attention_backend=backend)
    check(done, reference)
    # All twelve were in flight together: far fewer steps than sequential decoding would take.
    assert stats["steps"] < len(prompts) * MAX_NEW / 2


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_tiny_token_budget_chunks_prefill(tiny, prompts, reference, backend):
    done, stats = run_engine(tiny, prompts, greedy(MAX_NEW), num_blocks=256, block_size=8,
                             max_num_batched_tokens=8, attention_backend=backend)
    check(done, reference)
    total_prompt = sum(map(len, prompts))
    assert stats["prompt_tokens_computed"] == total_prompt
    assert stats["steps"] >= total_prompt / 8  # never more than 8 tokens a step


def test_tiny_pool_preempts_and_recomputes(tiny, prompts, reference):
    # 14 blocks of 8 tokens hold 112 tokens; the requests need ~430 together.
    done, stats = run_engine(tiny, prompts, greedy(MAX_NEW), num_blocks=14, block_size=8, preemption_mode="recompute")
    check(done, reference)
    assert stats["preemptions"] > 0


@pytest.mark.parametrize("block_size", [16, 32])
def test_block_sizes(tiny, prompts, reference, block_size):
    done, _ = run_engine(tiny, prompts, greedy(MAX_NEW), num_blocks=64, block_size=block_size, max_num_seqs=5)
    check(done, reference)
