"""Decode steps of several forwards (num_scheduler_steps): token for token what one forward per step gives, for
every way of sampling and of ending; the slots taken before their tokens were known are named and cached right;
nothing is leaked."""
from __future__ import annotations

import asyncio

import pytest
import torch

from kvmux import Engine, SamplingParams
from kvmux.cache.block_manager import BlockError, BlockManager
from kvmux.step.work import Chunk, Draw, StepWork

from engine_helpers import PROMPTS, greedy, hf_greedy, random_prompt, settled
from tiny_model import make_tiny_model

OPTIONS = {"dtype": "float32", "num_blocks": 96, "block_size": 8}
# Lengths that end a run of four forwards early, late and on its boundary.
CASES = [
    greedy(13),
    greedy(9, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(max_tokens=11, temperature=0.8, seed=7),
    SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=40, seed=3, logprobs=3),
    greedy(16, logprobs=2),
]


def run(tiny: str, steps: int, prompts: list[list[int]], params: list[SamplingParams]):
    async def main():
        async with Engine(tiny, num_scheduler_steps=steps, **OPTIONS) as engine:
            done = await asyncio.gather(*(engine.complete(p, sp) for p, sp in zip(prompts, params)))
            await settled(engine)
            return done, await engine.stats()
    return asyncio.run(main())


def same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    if a.logprobs is not None:
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("batch", [1, len(CASES)])
def test_several_forwards_per_step_give_the_tokens_of_one(tiny, batch):
    prompts = [PROMPTS[5 + i] for i in range(len(CASES))]
    cases = [(prompts[i:i + batch], CASES[i:i + batch]) for i in range(0, len(CASES), batch)]
    for p, params in cases:
        one, stats_one = run(tiny, 1, p, params)
        four, stats_four = run(tiny, 4, p, params)
        for a, b in zip(one, four):
            same(a, b)
        assert stats_one["forwards"] == stats_one["steps"]
        assert stats_four["forwards"] > stats_four["steps"], "no step ran several forwards"


def test_a_sequence_that_ends_inside_a_run_drops_the_tokens_after_its_end(tiny):
    """A stop token and a stop string met mid-run end the output where one forward per step ends it."""
    prompt = PROMPTS[8]
    [plain], _ = run(tiny, 1, [prompt], [greedy(20)])
    stop_token = plain.token_ids[5]  # met at the sixth output token: the second token of the second run of four
    cut = plain.token_ids.index(stop_token)
    params = [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_token]),
              SamplingParams(max_tokens=20, temperature=0, stop=[plain.text[len(plain.text) // 2:][:3]])]
    one, _ = run(tiny, 1, [prompt, prompt], params)
    four, stats = run(tiny, 4, [prompt, prompt], params)
    assert one[0].token_ids == plain.token_ids[:cut + 1] and one[0].finish_reason == "stop"
    for a, b in zip(one, four):
        same(a, b)
    assert stats["forwards"] > stats["steps"]


def test_blocks_filled_in_a_run_are_cached_under_their_tokens(tiny):
    """Slots taken before their tokens were sampled are hashed with the tokens sampled into them: a prompt that
    repeats the output hits the blocks the run wrote."""
    prompt = PROMPTS[4]  # 9 tokens: the output fills blocks 2 and 3 (block size 8)

    async def main():
        async with Engine(tiny, num_scheduler_steps=4, **OPTIONS) as engine:
            first = await engine.complete(prompt, greedy(24))
            before = (await engine.stats())["prefix_cache_hits"]
            again = await engine.complete(prompt + first.token_ids[:20], greedy(4))
            hits = (await engine.stats())["prefix_cache_hits"] - before
            await settled(engine)
            return first, again, hits

    first, again, hits = asyncio.run(main())
    assert hits == 24  # three full blocks: the prompt's and two the runs filled
    [plain], _ = run(tiny, 1, [prompt + first.token_ids[:20]], [greedy(4)])
    assert again.token_ids == plain.token_ids


def test_a_pool_too_small_for_the_runs_slots_keeps_the_outputs(tiny):
    """With a pool too small for the runs' slots (steps fall back to one forward, sequences are preempted), the
    outputs stay those of one forward per step and nothing is leaked."""
    prompts = [PROMPTS[9], PROMPTS[10]]
    params = [greedy(24), greedy(24)]
    one, _ = run(tiny, 1, prompts, params)

    async def main():
        async with Engine(tiny, num_scheduler_steps=8, dtype="float32", num_blocks=18, block_size=8) as engine:
            done = await asyncio.gather(*(engine.complete(p, sp) for p, sp in zip(prompts, params)))
            await settled(engine)
            return done

    for a, b in zip(one, asyncio.run(main())):
        same(a, b)


def test_fill_tokens_names_only_uncached_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.mark_computed("a", 4)
    bm.append_slots("a", [-1, -1, -1])
    bm.fill_tokens("a", 5, [6, 7, 8])
    bm.mark_computed("a", 8)
    bm.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.num_tokens("b") == 9 and bm.block_table("b")[:2] == bm.block_table("a")[:2]  # both blocks shared
    with pytest.raises(BlockError, match="not uncached slots"):
        bm.fill_tokens("a", 3, [9])  # a cached block
    with pytest.raises(BlockError, match="not uncached slots"):
        bm.fill_tokens("a", 8, [9])  # past its slots


def test_num_scheduler_steps_out_of_range_is_refused_by_name():
    from kvmux.config import ConfigError, EngineConfig

    for steps in (0, 33):
        with pytest.raises(ConfigError, match="num_scheduler_steps must be in"):
            EngineConfig(num_scheduler_steps=steps).validate()
    EngineConfig(num_scheduler_steps=32).validate()


def test_the_runner_refuses_several_forwards_over_chunks_that_cannot_take_them():
    from kvmux.cache.kv_cache import KVCache, PoolGeometry
    from kvmux.runner.runner import Runner

    geometry = PoolGeometry(num_layers=1, num_kv_heads=1, head_dim=8, block_size=8)
    runner = Runner(None, KVCache(4, geometry, sliding=KVCache(4, geometry)))
    draw = Draw(SamplingParams(temperature=0), seed=0, token_index=0, drafts=[3])
    with pytest.raises(ValueError, match="without drafts"):
        runner._check_steps(StepWork([Chunk("s", 0, [1, 3], [0], draw)], steps=2))
    with pytest.raises(ValueError, match="'p' does not"):
        runner._check_steps(StepWork([Chunk("p", 0, [1, 2, 3], [0])], steps=2))
    # Four forwards from position 6 write tokens 6..9, in blocks 0 and 1: both need a sliding slot.
    plain = Draw(SamplingParams(temperature=0), seed=0, token_index=0)
    for table in ([0], [0, -1]):
        with pytest.raises(ValueError, match="tokens 6..9 of 'w'.*no slot"):
            runner._check_steps(StepWork([Chunk("w", 6, [1], [0, 1], plain, sliding_table=table)], steps=4))
    runner._check_steps(StepWork([Chunk("w", 6, [1], [0, 1], plain, sliding_table=[0, 1])], steps=4))


def test_several_forwards_over_sliding_windows_give_the_tokens_of_one(tmp_path):
    """Gemma 3's sliding-window layers (a 10-token window): a run of forwards takes the slots for all its tokens at
    once and gives back those that leave the window after it; outputs are those of one forward per step, and
    transformers' greedy ones, past the window."""
    gemma = str(make_tiny_model(tmp_path / "gemma", model_type="gemma3_text", num_layers=3, num_kv_heads=1,
                                window=10, seed=3))
    prompts = [random_prompt(s, n) for s, n in enumerate([3, 14, 30])]
    params = [greedy(21), greedy(14), SamplingParams(max_tokens=19, temperature=0.9, seed=5)]
    one, stats_one = run(gemma, 1, prompts, params)
    four, stats_four = run(gemma, 4, prompts, params)
    for a, b in zip(one, four):
        same(a, b)
    assert stats_four["forwards"] > stats_four["steps"], "no step ran several forwards"
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    want = hf_greedy(hf, prompts[:2], 21)
    assert four[0].token_ids == want[0] and four[1].token_ids == want[1][:14]
