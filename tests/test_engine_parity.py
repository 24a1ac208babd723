"""Greedy outputs are token-for-token those of transformers' generate, however the engine batches them."""
import pytest

from engine_helpers import PROMPTS, greedy, run_engine

MAX_NEW = 12


def check(done, reference):
    for c, want in zip(done, reference):
        assert c.finish_reason == "length"
        assert c.token_ids == want[:MAX_NEW]  # a greedy continuation's prefix is the shorter continuation


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_many_prompts_at_once(tiny, reference, backend):
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), num_blocks=256, block_size=8, attention_backend=backend)
    check(done, reference)
    # All twelve were in flight together: far fewer steps than sequential decoding would take.
    assert stats["steps"] < len(PROMPTS) * MAX_NEW / 2


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_tiny_token_budget_chunks_prefill(tiny, reference, backend):
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), num_blocks=256, block_size=8,
                             max_num_batched_tokens=8, attention_backend=backend)
    check(done, reference)
    total_prompt = sum(map(len, PROMPTS))
    assert stats["prompt_tokens_computed"] == total_prompt
    assert stats["steps"] >= total_prompt / 8  # never more than 8 tokens a step


def test_tiny_pool_preempts_and_recomputes(tiny, reference):
    # 14 blocks of 8 tokens hold 112 tokens; the requests need ~410 together.
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), num_blocks=14, block_size=8, preemption_mode="recompute")
    check(done, reference)
    assert stats["preemptions"] > 0


@pytest.mark.parametrize("block_size", [16, 32])
def test_block_sizes(tiny, reference, block_size):
    done, _ = run_engine(tiny, PROMPTS, greedy(MAX_NEW), num_blocks=64, block_size=block_size, max_num_seqs=5)
    check(done, reference)
