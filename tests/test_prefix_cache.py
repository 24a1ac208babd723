"""Prefix caching and parallel sampling at the engine level: outputs never change, blocks are shared and returned."""
import asyncio
import random

import pytest

from kvmux import Engine, RequestRejected, SamplingParams

from engine_helpers import assert_no_leaks, greedy, hf_greedy, settled

MAX_NEW = 8
OPTIONS = dict(num_blocks=96, block_size=8, dtype="float32")


def ids(rng, n):
    return [rng.randrange(3, 320) for _ in range(n)]


def run_waves(model, waves, params, caching, **options):
    """Each wave's prompts run concurrently, after the previous wave ended; returns (completions, stats)."""
    async def main():
        async with Engine(model, enable_prefix_caching=caching, **{**OPTIONS, **options}) as engine:
            done = []
            for wave in waves:
                done += await asyncio.gather(*(engine.complete(p, params) for p in wave))
            stats = await engine.stats()
            assert_no_leaks(engine)
            return done, stats

    return asyncio.run(main())


def on_off(model, waves, params, **options):
    """Run with caching off and on; outputs must agree. Returns (outputs, stats with caching on)."""
    off, off_stats = run_waves(model, waves, params, caching=False, **options)
    on, on_stats = run_waves(model, waves, params, caching=True, **options)
    assert [c.token_ids for c in on] == [c.token_ids for c in off]
    assert off_stats["prefix_cache_hits"] == 0 and off_stats["cached_blocks"] == 0
    assert on_stats["prompt_tokens_computed"] == off_stats["prompt_tokens_computed"] - on_stats["prefix_cache_hits"]
    return [c.token_ids for c in on], on_stats


def test_identical_prompts(tiny, hf_tiny):
    prompt = ids(random.Random(1), 40)
    # Concurrent copies of one prompt wait for the first to compute it, then share it; so do later ones.
    outs, stats = on_off(tiny, [[prompt] * 3, [prompt] * 3], greedy(MAX_NEW))
    assert outs == hf_greedy(hf_tiny, [prompt], MAX_NEW) * 6
    assert stats["prefix_cache_hits"] == 5 * 32  # the last, partial block (and its token) is always computed
    assert 0 < stats["prefix_cache_hit_rate"] < 1
    assert stats["cached_blocks"] > 0


def test_shared_prefix_ending_mid_block(tiny, hf_tiny):
    rng = random.Random(2)
    system = ids(rng, 21)  # 2 full blocks of 8, then 5 tokens into the third
    prompts = [system + ids(rng, n) for n in (1, 4, 9, 17)]
    outs, stats = on_off(tiny, [prompts[:1], prompts[1:]], greedy(MAX_NEW))
    assert outs == hf_greedy(hf_tiny, prompts, MAX_NEW)
    assert stats["prefix_cache_hits"] == 3 * 16


def test_multi_turn_conversation_reuses_earlier_turns(tiny, hf_tiny):
    rng = random.Random(3)
    conversation = ids(rng, 19)

    async def chat(caching):
        history, replies = list(conversation), []
        async with Engine(tiny, enable_prefix_caching=caching, **OPTIONS) as engine:
            for _ in range(4):
                reply = await engine.complete(history, greedy(MAX_NEW))
                replies.append(reply.token_ids)
                history += reply.token_ids + ids(rng, 5)  # the next user turn
            stats = await engine.stats()
            assert_no_leaks(engine)
        return replies, history, stats

    rng = random.Random(3)
    off, _, _ = asyncio.run(chat(False))
    rng = random.Random(3)
    on, history, stats = asyncio.run(chat(True))
    assert on == off
    # Every later turn found the earlier turns (prompt and generated tokens) in the cache.
    assert stats["prefix_cache_hits"] >= 16 + 24 + 40
    assert on[-1] == hf_greedy(hf_tiny, [history[:-5 - MAX_NEW]], MAX_NEW)[0]


def test_chunked_prefill_of_identical_prompts_in_flight(tiny, hf_tiny):
    # A tiny token budget spreads each prompt over many steps while copies
    # arrive: a copy must never read blocks whose KV is not computed yet.
    prompt = ids(random.Random(4), 50)
    outs, stats = on_off(tiny, [[prompt] * 2, [prompt] * 3], greedy(MAX_NEW), max_num_batched_tokens=8)
    assert outs == hf_greedy(hf_tiny, [prompt], MAX_NEW) * 5
    assert stats["prefix_cache_hits"] > 0


def test_preemption_recomputes_from_its_own_cached_blocks(tiny, hf_tiny):
    rng = random.Random(5)
    prompts = [ids(rng, n) for n in (20, 33, 41, 57)]
    outs, stats = on_off(tiny, [prompts], greedy(12), num_blocks=14, preemption_mode="recompute")
    assert outs == hf_greedy(hf_tiny, prompts, 12)
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0


def test_parallel_greedy_samples_match_a_single_sample(tiny, hf_tiny):
    prompt = ids(random.Random(6), 13)
    done, stats = run_waves(tiny, [[prompt]], greedy(MAX_NEW, n=3), caching=True)
    want = hf_greedy(hf_tiny, [prompt], MAX_NEW)[0]
    assert [s.index for s in done[0].samples] == [0, 1, 2]
    assert [s.token_ids for s in done[0].samples] == [want] * 3
    assert all(s.finish_reason == "length" for s in done[0].samples)
    assert stats["prompt_tokens_computed"] == len(prompt)  # prefilled once for all three


@pytest.mark.parametrize("caching", [False, True])
def test_parallel_samples_have_own_seed_streams(tiny, caching):
    prompt = ids(random.Random(7), 30)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=1.0, seed=11, ignore_eos=True)
    single, _ = run_waves(tiny, [[prompt]], params, caching=caching)
    many, _ = run_waves(tiny, [[prompt]], SamplingParams(**{**vars(params), "n": 4}), caching=caching)
    samples = [s.token_ids for s in many[0].samples]
    assert samples[0] == single[0].token_ids  # sample 0 is exactly the n=1 request
    assert len({tuple(s) for s in samples}) > 1
    # On and off agree sample by sample.
    other, _ = run_waves(tiny, [[prompt]], SamplingParams(**{**vars(params), "n": 4}), caching=not caching)
    assert [s.token_ids for s in other[0].samples] == samples


def test_parallel_samples_stream_with_index_and_preempt(tiny):
    prompt = ids(random.Random(8), 30)

    async def main():
        async with Engine(tiny, num_blocks=12, block_size=8, dtype="float32") as engine:
            seen: dict[int, list[int]] = {}
            finished = set()
            async for out in engine.generate(prompt, greedy(30, n=3)):
                seen.setdefault(out.index, []).extend(out.token_ids)
                if out.finished:
                    finished.add(out.index)
            stats = await engine.stats()
            assert_no_leaks(engine)
            return seen, finished, stats

    seen, finished, stats = asyncio.run(main())
    assert finished == {0, 1, 2}
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 30
    assert stats["preemptions"] > 0  # 3 x 60 tokens do not fit in 96 slots together


def test_abort_parallel_request_frees_everything(tiny):
    async def main():
        async with Engine(tiny, **OPTIONS) as engine:
            async for out in engine.generate(ids(random.Random(9), 20), greedy(100, n=4)):
                if out.index == 3:
                    break
            await settled(engine)
            # The engine goes on serving.
            again = await engine.complete([5, 6, 7], greedy(3, n=2))
            assert [s.finish_reason for s in again.samples] == ["length", "length"]
            await settled(engine)

    asyncio.run(main())


def test_invalid_n_is_rejected(tiny):
    async def main():
        async with Engine(tiny, **OPTIONS) as engine:
            for n in (0, 65, 1.5):
                with pytest.raises(RequestRejected, match="n must be"):
                    await engine.complete([5, 6], SamplingParams(max_tokens=2, n=n))
            assert_no_leaks(engine)

    asyncio.run(main())
