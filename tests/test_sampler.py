"""The sampler against a float64 reference written out here: penalties, temperature, top-k, top-p, min-p, and
logprobs taken from the very distribution the token was drawn from."""
from __future__ import annotations

import math

import pytest
import torch

from kvmux.runner.sampler import argmax_rows, filtered, sample
from kvmux.sampling import SamplingParams

VOCAB = 50


def reference_logprobs(logits: torch.Tensor, p: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """log-probabilities of the distribution SamplingParams describes, in float64, one filter at a time."""
    x = logits.double().clone()
    for token in set(output_ids):
        x[token] -= p.frequency_penalty * output_ids.count(token) + p.presence_penalty
    if p.greedy:
        return torch.log_softmax(x, -1)
    x = x / p.temperature
    keep = torch.ones(len(x), dtype=torch.bool)
    if p.top_k and p.top_k < len(x):
        keep &= x >= torch.sort(x, descending=True).values[p.top_k - 1]
    if p.top_p < 1:
        probs = torch.softmax(x.masked_fill(~keep, -math.inf), -1)
        mass, kept = 0.0, torch.zeros_like(keep)
        for token in torch.argsort(probs, descending=True).tolist():
            if mass >= p.top_p:
                break
            kept[token] = True
            mass += float(probs[token])
        keep &= kept
    if p.min_p:
        probs = torch.softmax(x.masked_fill(~keep, -math.inf), -1)
        keep &= probs >= p.min_p * probs.max()
    return torch.log_softmax(x.masked_fill(~keep, -math.inf), -1)


def draw(logits, p, output_ids=(), seed=0, step=0):
    return sample(logits[None], [p], [seed], [step], [list(output_ids)])[0]


def check_against_reference(logits, p, output_ids=(), seeds=range(20)):
    ref = reference_logprobs(logits, p, list(output_ids))
    finite = int(torch.isfinite(ref).sum())
    for seed in seeds:
        got = draw(logits, p, output_ids, seed=seed)
        assert torch.isfinite(ref[got.token]), "the token was drawn from outside the distribution"
        assert got.logprob == pytest.approx(float(ref[got.token]), abs=1e-4)
        assert len(got.top) == min(p.logprobs, finite)
        ref_top = torch.topk(ref, len(got.top))
        assert [t for t, _ in got.top] == ref_top.indices.tolist()
        assert [v for _, v in got.top] == pytest.approx(ref_top.values.tolist(), abs=1e-4)
    return ref


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.9, min_p=0.2),
    SamplingParams(temperature=1.1, top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=0.8, presence_penalty=1.5, frequency_penalty=-0.5, top_k=10),
])
def test_logprobs_come_from_the_sampled_distribution(params):
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    params.logprobs = 5
    check_against_reference(logits, params, output_ids=[3, 3, 7, 11, 3])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.95, 0.999])
def test_top_p_over_a_wide_vocabulary(top_p):
    """Nuclei of 329 to 19,904 of 20,000 near-flat logits (no top-k): found by widening the likeliest 64 until
    they hold top_p, as a sort of the whole row finds them."""
    logits = torch.randn(20_000, generator=torch.Generator().manual_seed(5)) * 0.5
    params = SamplingParams(temperature=1.0, top_k=0, top_p=top_p)
    got = filtered(logits, params)
    params.logprobs = 3
    ref = check_against_reference(logits, params, seeds=range(4))
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))


def test_greedy_logprobs_are_the_penalized_log_softmax():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2)) * 2
    plain = draw(logits, SamplingParams(temperature=0, logprobs=3))
    assert plain.token == int(logits.argmax())
    check_against_reference(logits, SamplingParams(temperature=0, logprobs=3), seeds=[0])
    # Penalties move the argmax: the token produced three times loses to the runner-up.
    top2 = torch.topk(logits, 2).indices.tolist()
    penalized = draw(logits, SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=2), [top2[0]] * 3)
    assert penalized.token == top2[1]
    ref = check_against_reference(logits, SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=2),
                                  [top2[0]] * 3, seeds=[0])
    assert penalized.token == int(ref.argmax())


def test_no_logprobs_unless_asked_and_zero_gives_only_the_token():
    logits = torch.randn(VOCAB)
    assert draw(logits, SamplingParams(temperature=1.0, seed=1)).logprob is None
    assert draw(logits, SamplingParams(temperature=0)).top is None
    only = draw(logits, SamplingParams(temperature=1.0, logprobs=0))
    assert only.top == [] and only.logprob <= 0


def test_min_p_one_keeps_only_the_likeliest_token():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    for seed in range(10):
        got = draw(logits, SamplingParams(temperature=1.5, min_p=1.0, logprobs=4), seed=seed)
        assert got.token == int(logits.argmax())
        assert got.logprob == pytest.approx(0.0, abs=1e-6) and got.top == [(got.token, got.logprob)]


def test_min_p_sampling_frequencies_follow_the_reference():
    # Seeds are fixed, so this is deterministic; 4000 draws put each frequency within a few percent.
    logits = torch.tensor([2.0, 1.6, 1.0, 0.1, -0.5, -3.0])
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)  # min_p alone
    probs = reference_logprobs(logits, p, []).exp()
    counts = torch.zeros(len(logits))
    for seed in range(4000):
        counts[draw(logits, p, seed=seed).token] += 1
    assert counts[probs == 0].sum() == 0
    assert (counts / counts.sum()).tolist() == pytest.approx(probs.tolist(), abs=0.03)


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.zeros(VOCAB)
    logits[4], logits[5] = 1.0, 0.9
    p = SamplingParams(temperature=0, presence_penalty=0.05, frequency_penalty=0.04, logprobs=2)
    # Token 4 produced once: 1.0 - 0.04 - 0.05 = 0.91 still beats 0.9; twice: 0.87 does not.
    assert draw(logits, p, [4]).token == 4
    assert draw(logits, p, [4, 4]).token == 5
    negative = SamplingParams(temperature=0, presence_penalty=-1.5)  # a negative penalty encourages repeats
    assert draw(logits, negative, [9]).token == 9


def test_each_row_keeps_its_own_stream_whatever_the_batch():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(4))
    rows = [SamplingParams(temperature=0.8, min_p=0.1, logprobs=2), SamplingParams(temperature=0),
            SamplingParams(temperature=1.0, frequency_penalty=1.0), SamplingParams(temperature=0.5, top_p=0.8)]
    history = [[1, 2], [], [7, 7, 7], []]
    together = sample(logits, rows, [11, 12, 13, 14], [3, 3, 3, 3], history)
    for i in range(4):
        alone = sample(logits[i:i + 1], [rows[i]], [11 + i], [3], [history[i]])[0]
        assert alone == together[i]


@pytest.mark.parametrize("field, value", [
    ("min_p", -0.1), ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logprobs", 21),
    ("logprobs", -1), ("temperature", float("inf")), ("top_p", float("nan")), ("seed", 2**63), ("max_tokens", 0),
    ("presence_penalty", float("nan")),
])
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()
    SamplingParams(max_tokens=None, min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=20,
                   seed=-(2**63)).validate()


@pytest.mark.parametrize("rows,cols", [(1, 5), (3, 49152), (64, 262144), (2, 32768 * 2 + 1)])
def test_argmax_rows_is_torchs_first_max(rows, cols):
    """The native argmax over chunks of each row: ties go to the first (within a chunk and across chunks), a NaN
    to the first NaN, and -inf rows to 0, as torch's max says; rows may be strided."""
    g = torch.Generator().manual_seed(rows * 7 + cols)
    wide = torch.randn(rows, cols + 3, generator=g)
    logits = wide[:, 1:1 + cols]  # rows a stride apart
    top = logits.max() + 1
    logits[0, cols // 2] = top  # a tie, reached first in an earlier chunk
    logits[0, cols - 1] = top
    if rows > 1:
        logits[1] = float("-inf")
    if rows > 2:
        logits[2, cols // 3] = float("nan")
        logits[2, cols - 1] = float("nan")
    got = argmax_rows(logits)
    assert torch.equal(got, logits.max(dim=-1).indices)
    assert got[0] == cols // 2
