"""Speculative decoding: the outputs never change (greedy and seeded sampling alike), whatever happens to the
sequences; the rule verification applies; the proposers; and no block outlives its sequence."""
import asyncio
import json
import random

import pytest
import torch

from kvmux import Engine, SamplingParams
from kvmux.config import ConfigError, EngineConfig, SpeculativeConfig
from kvmux.engine import messages
from kvmux.engine.proposers import NgramIndex, SuffixCache, continuation
from kvmux.engine.speculation import Speculator
from kvmux.runner.sampler import verify
from kvmux.sampling import StructuredOutputs

from engine_helpers import MAX_NEW, PROMPTS, greedy, run_engine, settled
from tiny_model import make_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1, "max_batch": 64}
SUFFIX = {**NGRAM, "method": "suffix"}
# Prompts that repeat themselves, so the lookup finds what to propose even before the output does.
REPEATING = [p * 3 for p in PROMPTS[3:8]] + [PROMPTS[9] + PROMPTS[9][:20]]


def draft_model(model: str) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": 4, "max_batch": 64}


def spec_for(name: str, tiny: str) -> dict:
    """A parametrized test's speculative_config: the n-gram lookup, or the tiny model drafting for itself."""
    return NGRAM if name == "ngram" else draft_model(tiny)


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test: the chance of a statistic this large if `observed` follows `expected`."""
    stat = ((observed - expected) ** 2 / expected).sum()
    df = torch.tensor(float(len(observed) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat.double() / 2))


def draft_stats(stats: dict) -> tuple[int, int]:
    return stats["spec_draft_tokens"], stats["spec_accepted_tokens"]


# -- the engine: outputs as without speculation ------------------------------------------------------------------

@pytest.mark.parametrize("spec", [NGRAM, SUFFIX], ids=["ngram", "suffix"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_outputs_are_transformers(tiny, reference, spec, block_size):
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), block_size=block_size, speculative_config=spec)
    assert [c.token_ids for c in done] == reference
    proposed, accepted = draft_stats(stats)
    assert proposed > 0 and accepted > 0  # the tiny model repeats itself: drafts are made and taken


@pytest.mark.parametrize("block_size", [8, 16])
def test_draft_model_outputs_are_transformers(tiny, tiny_draft, reference, block_size):
    """The tiny model drafting for itself has its drafts accepted; another model's are mostly rejected. The
    outputs are transformers' either way."""
    done, same = run_engine(tiny, PROMPTS, greedy(MAX_NEW), block_size=block_size,
                            speculative_config=draft_model(tiny))
    assert [c.token_ids for c in done] == reference
    assert same["spec_accepted_tokens"] >= 0.95 * same["spec_draft_tokens"] > 0
    done, other = run_engine(tiny, PROMPTS, greedy(MAX_NEW), block_size=block_size,
                             speculative_config=draft_model(tiny_draft))
    assert [c.token_ids for c in done] == reference
    assert other["spec_draft_tokens"] > 0 and other["spec_acceptance_rate"] < 0.5


def test_a_draft_model_with_another_tokenizer_is_refused(tiny, tmp_path):
    other = make_tiny_model(tmp_path / "other", vocab=300)

    async def main():
        async with Engine(tiny, dtype="float32", speculative_config=draft_model(str(other))):
            pass

    with pytest.raises(ConfigError, match="speculative_config") as info:
        asyncio.run(main())
    assert "cannot draft for" in str(info.value) and "tokenizer differs" in str(info.value)


@pytest.mark.parametrize("spec", ["ngram", "draft_model"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_greedy_outputs_survive_preemption_and_prefix_hits(tiny, reference, mode, spec):
    tight = dict(num_blocks=12, block_size=8, preemption_mode=mode, speculative_config=spec_for(spec, tiny))
    done, stats = run_engine(tiny, PROMPTS + PROMPTS, greedy(MAX_NEW), **tight)
    assert [c.token_ids for c in done] == reference + reference
    assert stats[f"preemptions_{mode}"] > 0 and stats["spec_accepted_tokens"] > 0
    assert stats["prefix_cache_hits"] > 0


@pytest.mark.parametrize("spec", ["ngram", "draft_model"])
def test_sampled_outputs_are_token_for_token_those_without_speculation(tiny, spec):
    """Seeded sampling with penalties, logprobs, stop strings, n > 1 and max_tokens: each token is drawn from
    the same stream and distribution as without speculation, so the outputs are equal, not only alike."""
    params = [SamplingParams(max_tokens=24, temperature=0.7, seed=s, ignore_eos=True) for s in range(4)]
    params += [SamplingParams(max_tokens=20, temperature=1.0, top_k=5, seed=11, n=3, ignore_eos=True),
               SamplingParams(max_tokens=20, temperature=0.5, presence_penalty=0.3, frequency_penalty=0.2, seed=3,
                              ignore_eos=True),
               SamplingParams(max_tokens=20, temperature=0, logprobs=3, ignore_eos=True),
               SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
               SamplingParams(max_tokens=30, temperature=0, stop=["a"], ignore_eos=True)]
    prompts = [REPEATING[i % len(REPEATING)] for i in range(len(params))]
    off, _ = run_engine(tiny, prompts, params, block_size=8)
    on, stats = run_engine(tiny, prompts, params, block_size=8, speculative_config=spec_for(spec, tiny))
    assert stats["spec_accepted_tokens"] > 0
    for a, b in zip(off, on):
        assert [(s.token_ids, s.text, s.finish_reason) for s in a.samples] == \
            [(s.token_ids, s.text, s.finish_reason) for s in b.samples]
        for x, y in zip(a.samples, b.samples):
            if x.logprobs is not None:
                torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-4, rtol=0)
                assert [[t for t, _ in top] for top in y.top_logprobs] == [[t for t, _ in top] for top in x.top_logprobs]
    assert len(on[7].token_ids) == 9  # max_tokens is never overshot by an accepted run


def test_structured_outputs_accept_only_drafts_the_constraint_allows(tiny):
    """A regex the output must match, and a prompt that makes the lookup propose text it forbids."""
    regex = "(ab|cd){6,12}"
    params = [SamplingParams(max_tokens=30, temperature=t, seed=4, structured_outputs=StructuredOutputs(regex=regex))
              for t in (0, 0.8)]
    prompts = ["abababcdcdcdabxyabab", "cdcdababcdcd zz cdcd"]
    off, _ = run_engine(tiny, prompts, params)
    on, stats = run_engine(tiny, prompts, params, speculative_config={**NGRAM, "prompt_lookup_min": 2})
    assert [c.text for c in on] == [c.text for c in off]
    import re
    assert all(re.fullmatch(regex, c.text) for c in on)
    assert stats["spec_draft_tokens"] > 0


def test_large_batches_do_not_speculate(tiny, reference):
    done, stats = run_engine(tiny, PROMPTS, greedy(MAX_NEW), speculative_config={**NGRAM, "max_batch": 2})
    assert [c.token_ids for c in done] == reference
    assert stats["spec_steps_skipped"] > 0


@pytest.mark.parametrize("spec", ["ngram", "draft_model"])
def test_tensor_parallel_with_speculation(tiny, reference, spec):
    """A draft model runs whole in the engine's process, beside the ranks."""
    done, stats = run_engine(tiny, PROMPTS[:6], greedy(MAX_NEW), tensor_parallel_size=2, threads=1,
                             speculative_config=spec_for(spec, tiny))
    assert [c.token_ids for c in done] == reference[:6]
    assert stats["spec_accepted_tokens"] > 0


def test_the_suffix_method_proposes_from_earlier_outputs():
    """An earlier request's output (with the end of its prompt) answers a sequence whose own tokens cannot."""
    earlier, prompt_len = [1, 2, 3, 4, 5, 6, 7], 3  # prompt 1 2 3, output 4 5 6 7
    suffix = Speculator(SpeculativeConfig.from_dict({"method": "suffix"}))
    ngram = Speculator(SpeculativeConfig.from_dict({"method": "ngram"}))
    for spec in (suffix, ngram):
        spec.finished(earlier, prompt_len)
    assert suffix.propose([("b", [9, 8, 3, 4], 3)]) == {"b": [5, 6, 7]}
    assert ngram.propose([("b", [9, 8, 3, 4], 3)]) == {}
    assert suffix.stats()["spec_suffix_cached_tokens"] == len(earlier)


def test_suffix_outputs_are_transformers_with_earlier_outputs_cached(tiny, reference):
    done, stats = run_engine(tiny, PROMPTS[10:], greedy(MAX_NEW), max_num_seqs=1,
                             speculative_config={**SUFFIX, "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    assert [c.token_ids for c in done] == reference[10:]
    assert stats["spec_suffix_cached_tokens"] > 0 and stats["spec_accepted_tokens"] > 0


# -- verification: the rejection rule ----------------------------------------------------------------------------

def test_verification_follows_the_rejection_rule():
    """Over many seeds, with target p on a 6-token vocabulary and a draft d proposed with certainty: d is
    accepted with probability p(d), and the token emitted at a rejection follows p given not-d (the normalised
    residual). Chi-square tests at p-value 1e-4 on a fixed seed set: a correct rule fails such a test with
    probability 1e-4 per seed set, and this one is fixed, so the test's outcome is the same on every run."""
    p = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])
    logits = torch.log(p).repeat(2, 1)  # the draft's row and the row after it
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    draft = 1
    first = torch.zeros(6)
    rejected = torch.zeros(6)
    runs = 20000
    for seed in range(runs):
        run = verify(logits, params, seed, 0, [], [draft])
        first[run[0].token] += 1
        if run[0].token != draft:
            rejected[run[0].token] += 1
            assert len(run) == 1
        else:
            assert len(run) == 2
    assert chi_square_pvalue(first, p * runs) > 1e-4
    residual = p.clone()
    residual[draft] = 0
    residual /= residual.sum()
    assert rejected[draft] == 0
    keep = residual > 0
    assert chi_square_pvalue(rejected[keep], residual[keep] * rejected.sum()) > 1e-4
    acceptance = first[draft] / runs
    assert abs(acceptance - p[draft]) < 4 * (p[draft] * (1 - p[draft]) / runs) ** 0.5


def test_greedy_verification_accepts_the_agreeing_prefix():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 2]):
        logits[row, best] = 5.0
    params = SamplingParams(temperature=0)
    assert [s.token for s in verify(logits, params, 0, 0, [], [3, 4, 7])] == [3, 4, 9]
    assert [s.token for s in verify(logits, params, 0, 0, [], [3, 4, 9])] == [3, 4, 9, 2]
    assert [s.token for s in verify(logits, params, 0, 0, [], [8, 4, 9])] == [3]


# -- proposers ----------------------------------------------------------------------------------------------------

def test_ngram_index_proposes_what_followed_the_latest_longest_match():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3]
    # (2, 3) occurred twice before: followed by 4 then 5; (1, 2, 3) once, followed by 4: the longest wins.
    assert index.propose(tokens, 3) == (3, [4, 9, 2])
    tokens += [5]
    assert index.propose(tokens, 2) == (3, [7, 1])  # (2, 3, 5) after indexing the tokens added since
    assert NgramIndex(2, 3).propose([1, 2, 3], 2) == (0, [])


def test_a_repeating_tail_is_continued_with_its_period():
    assert continuation([7, 1, 2, 1, 2], 3, 5) == [1, 2, 1, 2, 1]
    assert NgramIndex(1, 2).propose([5, 5, 5], 4) == (2, [5, 5, 5, 5])


def test_the_suffix_cache_forgets_its_oldest_texts():
    cache = SuffixCache(1, 2, capacity=8)
    cache.add([1, 2, 3, 4])
    assert cache.propose([9, 2], 2) == (1, [3, 4])
    cache.add([5, 6, 7, 8, 2, 9])  # 10 tokens held: the first text goes
    assert cache.size == 6
    assert cache.propose([1, 2], 2) == (1, [9])
    assert cache.propose([3], 1) == (0, [])


# -- configuration --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, words", [
    ({"method": "eagle"}, "method must be one of ngram, suffix, draft_model"),
    ({"method": "draft_model"}, "model names the draft model, which method draft_model needs"),
    ({"method": "ngram", "model": "m.gguf"}, "model names the draft model"),
    ({"method": "draft_model", "model": 7}, "model must be a string"),
    ({"method": "draft_model", "model": "m.gguf", "quantization": "q4"}, "quantization is the draft model's"),
    ({"method": "ngram", "quantization": "none"}, "quantization is the draft model's (draft_model only)"),
    ({"method": "draft_model", "model": "/nowhere/draft.gguf"}, "model: '/nowhere/draft.gguf' does not exist"),
    ({"num_speculative_tokens": 2}, "needs a method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in 1..32"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max must be >="),
    ({"method": "ngram", "prompt_lookup_max": 1000}, "prompt_lookup_max must be >= prompt_lookup_min and <= 32"),
    ({"method": "ngram", "lookahead": 3}, "unknown keys ['lookahead']"),
    ({"method": "ngram", "max_batch": "8"}, "max_batch must be an integer"),
])
def test_bad_speculative_configs_are_refused_by_name(value, words):
    with pytest.raises(ConfigError, match="speculative_config") as info:
        EngineConfig(speculative_config=value).validate()
    assert words in str(info.value)


def test_defaults_are_vllms():
    spec = SpeculativeConfig.from_dict({"method": "ngram"})
    assert (spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == (4, 4, 2)


@pytest.mark.parametrize("spec", ["ngram", "draft_model"])
def test_random_prompts_keep_the_allocator_whole(tiny, tiny_draft, spec):
    """Many short requests with drafts rejected and accepted at every block boundary: run_engine checks every
    block (the draft model's too) is free and the invariants hold at the end."""
    rng = random.Random(7)
    prompts = [rng.choices(range(3, 40), k=rng.randint(1, 40)) for _ in range(24)]
    params = [greedy(rng.randint(1, 20)) for _ in prompts]
    done, stats = run_engine(tiny, prompts, params, block_size=8, num_blocks=40,
                             speculative_config=NGRAM if spec == "ngram" else draft_model(tiny_draft))
    assert [len(c.token_ids) for c in done] == [p.max_tokens for p in params]
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"] > 0


def test_serve_takes_the_flag_and_metrics_count_the_drafts(tiny, reference):
    """`kvmux serve --speculative-config JSON`, driven by the openai SDK; Prometheus counts drafts per method."""
    import urllib.request

    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from server_helpers import serve_http

    server, url = serve_http("--model", tiny, "--dtype", "float32", "--speculative-config", json.dumps(NGRAM))
    try:
        client = openai.OpenAI(base_url=url, api_key="none")
        done = client.completions.create(model="m", prompt=PROMPTS[11], max_tokens=MAX_NEW, temperature=0,
                                         extra_body={"ignore_eos": True})
        text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
        counts = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name.startswith("kvmux_spec_decode") and s.labels == {"method": "ngram"}}
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.choices[0].finish_reason == "length"
    assert counts["kvmux_spec_decode_num_accepted_tokens_total"] > 0
    assert counts["kvmux_spec_decode_num_draft_tokens_total"] >= counts["kvmux_spec_decode_num_accepted_tokens_total"]


def test_a_bad_flag_is_refused_naming_it(tiny):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "kvmux", "generate", "--model", tiny, "--speculative-config",
                          '{"method": "ngram", "num_speculative_tokens": 99}', "hi"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "speculative" in run.stderr and "num_speculative_tokens must be in 1..32" in run.stderr


def test_an_abort_while_the_step_is_planned_ends_only_its_request(tiny, reference):
    """Drafts are proposed before decode waits for prefill's plan, and an abort handled during that wait takes
    its sequence away: the step goes on for the others."""
    async def main():
        async with Engine(tiny, dtype="float32", speculative_config=NGRAM) as engine:
            decode = engine.decode
            reply, propose = decode._reply, decode._propose
            aborted, drafted = [], {}

            async def remember():
                drafted.clear()
                drafted.update(await propose())
                decode.prefill_ready = True  # ask prefill for a plan even with nothing waiting: the wait is the test
                return dict(drafted)

            async def abort_during_the_plan(kind, step):
                victims = [s for s in decode.running.values() if s.request_id == "victim" and s.seq_id in drafted]
                if kind is messages.StepPlan and victims and not aborted:
                    aborted.append(victims[0].seq_id)
                    decode._dispatch(messages.Abort("victim", victims[0].serial))
                return await reply(kind, step)
            decode._reply, decode._propose = abort_during_the_plan, remember
            victim = asyncio.ensure_future(engine.complete(PROMPTS[10], greedy(MAX_NEW), request_id="victim"))
            other = await engine.complete(PROMPTS[11], greedy(MAX_NEW))
            victim = await victim
            await settled(engine)
            return other, victim, aborted, await engine.stats()

    other, victim, aborted, stats = asyncio.run(main())
    assert aborted and victim.finish_reason == "abort"
    assert other.token_ids == reference[11] and other.finish_reason == "length"
    assert stats["spec_accepted_tokens"] > 0
