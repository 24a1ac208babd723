"""logprobs, penalties, min_p, an open max_tokens and cache salts through the engine and the socket protocol,
checked against transformers on the same weights."""
from __future__ import annotations

import asyncio

import pytest
import torch

from kvmux import Engine, SamplingParams
from kvmux.serve.client import AsyncClient

from engine_helpers import PROMPT, PROMPTS, greedy, hf_greedy, random_prompt, wire
from server_helpers import Served

OPTIONS = {"num_blocks": 96, "block_size": 8, "max_pending": 16}


@pytest.fixture(scope="module")
def served(tiny):
    """One engine for the module, with the socket server in front of it for the protocol's test."""
    s = Served(tiny, OPTIONS)
    yield s
    s.close()


def hf_logprobs(hf_model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each output position: [len(output), vocab]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + output])).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1:-1], -1)


def hf_penalized_greedy(hf_model, prompt: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding with OpenAI's penalties applied by hand to transformers' logits."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + out])).logits[0, -1].double()
        for token in set(out):
            logits[token] -= frequency * out.count(token) + presence
        out.append(int(logits.argmax()))
    return out


def run(served: Served, coro_fn):
    """coro_fn(engine) on the module's engine; then nothing may be left held."""
    result = served.call(coro_fn(served.engine))
    served.settle()
    return result


def test_greedy_logprobs_match_transformers(served, hf_tiny):
    prompts = PROMPTS[2:6]

    async def go(engine):
        return await asyncio.gather(*(engine.complete(p, greedy(12, logprobs=5)) for p in prompts))

    for prompt, done in zip(prompts, run(served, go)):
        ref = hf_logprobs(hf_tiny, prompt, done.token_ids)
        assert len(done.logprobs) == len(done.top_logprobs) == 12
        for i, token in enumerate(done.token_ids):
            assert done.logprobs[i] == pytest.approx(float(ref[i, token]), abs=1e-4)
            assert_top(done.top_logprobs[i], ref[i], 5)
            assert done.top_logprobs[i][0][0] == token  # greedy took the likeliest


def assert_top(top: list, ref: torch.Tensor, k: int) -> None:
    """top holds k (token, logprob) pairs, likeliest first, each as the reference has it, and no other token
    is likelier (up to float32 noise, which may swap near-ties)."""
    assert len(top) == k
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert [v for _, v in top] == pytest.approx([float(ref[t]) for t, _ in top], abs=1e-4)
    rest = ref.clone()
    rest[[t for t, _ in top]] = float("-inf")
    assert float(rest.max()) <= top[-1][1] + 1e-4


def test_sampled_logprobs_per_parallel_sample(served):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=12, seed=5, n=3, logprobs=3, ignore_eos=True)

    async def go(engine):
        return await engine.complete(PROMPT, params), await engine.complete(PROMPT, SamplingParams(
            **{**wire(params), "n": 1}))

    many, single = run(served, go)
    assert single.token_ids == many.token_ids and single.logprobs == pytest.approx(many.logprobs)
    for sample in many.samples:
        assert len(sample.logprobs) == len(sample.token_ids) == 10
        for token, logprob, top in zip(sample.token_ids, sample.logprobs, sample.top_logprobs):
            assert len(top) == 3 and top[0][1] >= logprob > float("-inf")
            listed = dict(top)  # a sampled token need not be among the three likeliest
            assert listed[token] == logprob if token in listed else logprob <= top[-1][1]
    assert len({tuple(s.token_ids) for s in many.samples}) > 1


def test_penalties_match_the_formula_on_transformers_logits(served, hf_tiny):
    prompt = PROMPTS[4]
    plain = hf_greedy(hf_tiny, [prompt], 16)[0]
    expected = hf_penalized_greedy(hf_tiny, prompt, 16, presence=0.8, frequency=0.6)
    assert expected != plain  # the penalties matter on this prompt, so the check below means something

    async def go(engine):
        return await engine.complete(prompt, greedy(16, presence_penalty=0.8, frequency_penalty=0.6))

    assert run(served, go).token_ids == expected


def test_min_p_one_samples_the_greedy_continuation(served, reference):
    async def go(engine):
        return await asyncio.gather(*(engine.complete(p, SamplingParams(
            max_tokens=8, temperature=1.7, min_p=1.0, seed=s, ignore_eos=True)) for s, p in enumerate(PROMPTS[:4])))

    assert [c.token_ids for c in run(served, go)] == [r[:8] for r in reference[:4]]


def test_open_max_tokens_runs_to_the_context_length(tiny):
    async def main():
        async with Engine(tiny, **OPTIONS, max_model_len=40) as engine:
            return await engine.complete(PROMPT, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))

    done = asyncio.run(main())
    assert (done.num_output_tokens, done.finish_reason) == (40 - len(PROMPT), "length")


def test_cache_salt_isolates_prefix_caches(served, hf_tiny):
    prompt = random_prompt(1001, 64)  # 7 cacheable blocks of 8 that no other test of the module caches

    async def go(engine):
        hits = [(await engine.stats())["prefix_cache_hits"]]  # the engine's, since its start
        outputs = []
        for salt in (None, "a", "b", "a", None, "b"):
            outputs.append((await engine.complete(prompt, greedy(4), cache_salt=salt)).token_ids)
            hits.append((await engine.stats())["prefix_cache_hits"])
        return outputs, hits

    outputs, hits = run(served, go)
    assert outputs == hf_greedy(hf_tiny, [prompt], 4) * 6  # outputs never depend on the cache
    found = [b - a for a, b in zip(hits, hits[1:])]
    assert found == [0, 0, 0, 56, 56, 56]  # a salt finds only its own blocks; the same salt shares as before


def test_a_bad_cache_salt_is_refused(served):
    async def go(engine):
        for salt in ("", "x" * 257, 7):
            with pytest.raises(Exception) as info:
                await engine.complete(PROMPT, greedy(2), cache_salt=salt)
            assert getattr(info.value, "code", None) == "invalid_params" and "cache_salt" in str(info.value)
        with pytest.raises(Exception) as info:
            await engine.complete("\ud800 lone surrogate", greedy(2))
        assert info.value.code == "invalid_params"
        assert (await engine.complete(PROMPT, greedy(2), cache_salt="x" * 256)).num_output_tokens == 2

    run(served, go)


def test_request_records_reach_listeners(served):
    records = []

    async def go(engine):
        engine.request_listeners.append(records.append)
        try:
            await engine.complete(PROMPT, SamplingParams(max_tokens=5, temperature=0.5, n=2, seed=1, ignore_eos=True))
            with pytest.raises(Exception):
                await engine.complete(PROMPT, greedy(0))
        finally:
            engine.request_listeners.remove(records.append)

    run(served, go)
    done, refused = records
    assert done.finish_reasons == ["length", "length"] and done.num_output_tokens == 10 and done.longest_sample == 5
    assert done.num_prompt_tokens == len(PROMPT)
    assert 0 <= done.queue_s <= done.first_token_s <= done.last_token_s <= done.end_s
    assert refused.rejected == "invalid_params" and refused.finish_reasons == []


def test_the_socket_protocol_carries_the_new_fields(served):
    params = SamplingParams(max_tokens=6, temperature=0.8, min_p=0.05, presence_penalty=0.5,
                            frequency_penalty=0.3, seed=9, logprobs=2, ignore_eos=True)
    expected = served.call(served.engine.complete(PROMPT, params))

    async def main():
        async with AsyncClient(served.path) as client:
            outs = [o async for o in client.generate(PROMPT, wire(params), cache_salt="t1")]
            whole = await client.complete(PROMPT, {**wire(params), "max_tokens": None, "logprobs": None})
            return outs, whole

    outs, whole = asyncio.run(main())
    assert [t for o in outs for t in o.token_ids] == expected.token_ids
    assert [v for o in outs for v in o.logprobs] == pytest.approx(expected.logprobs)
    assert [top for o in outs for top in o.top_logprobs] == expected.top_logprobs
    assert whole.logprobs is None and whole.finish_reason in ("stop", "length")
    served.settle()
