"""A seeded, ShareGPT-like workload: long-tailed prompt and output lengths, random token ids, arrival times.

Lengths are log-normal (a long right tail, like chat traffic: most requests
short, a few long), rounded and clipped:
  prompt  ~ LogNormal(ln 128, 1.0) clipped to [8, 512] tokens
  output  ~ LogNormal(ln 64, 0.9)  clipped to [8, 256] tokens
Prompt ids are drawn uniformly from the vocabulary minus special/added tokens,
so no prompt contains an end-of-sequence or chat-control token. Every request
must produce exactly its output length (EOS is ignored by every engine).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class WorkloadSpec:
    num_requests: int = 64
    seed: int = 0
    prompt_median: float = 128.0
    prompt_sigma: float = 1.0
    prompt_clip: tuple[int, int] = (8, 512)
    output_median: float = 64.0
    output_sigma: float = 0.9
    output_clip: tuple[int, int] = (8, 256)
    shared_prefix_len: int = 0  # > 0: every prompt starts with one shared prefix of this many tokens
    rate: float | None = None  # requests/s of Poisson arrivals; None: all arrive at once (offline)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    output_len: int
    arrival: float  # seconds after the run starts


def _lengths(rng: np.random.Generator, n: int, median: float, sigma: float, clip: tuple[int, int]) -> np.ndarray:
    raw = rng.lognormal(math.log(median), sigma, size=n)
    return np.clip(np.rint(raw), clip[0], clip[1]).astype(int)


def allowed_token_ids(vocab_size: int, special_ids: set[int]) -> np.ndarray:
    return np.array([i for i in range(vocab_size) if i not in special_ids], dtype=np.int64)


def make_workload(spec: WorkloadSpec, vocab_size: int, special_ids: set[int]) -> list[Request]:
    """The requests of `spec`, identical for the same spec and vocabulary."""
    rng = np.random.default_rng(spec.seed)
    tokens = allowed_token_ids(vocab_size, special_ids)
    n = spec.num_requests
    if spec.shared_prefix_len:
        # The suffix replaces the prompt: total prompt = prefix + a suffix whose
        # length follows the prompt distribution, clipped so prompts stay bounded.
        prefix = rng.choice(tokens, size=spec.shared_prefix_len).tolist()
        suffix_clip = (spec.prompt_clip[0], max(spec.prompt_clip[0], spec.prompt_clip[1] - spec.shared_prefix_len))
        prompt_lens = _lengths(rng, n, spec.prompt_median, spec.prompt_sigma, suffix_clip)
    else:
        prefix = []
        prompt_lens = _lengths(rng, n, spec.prompt_median, spec.prompt_sigma, spec.prompt_clip)
    output_lens = _lengths(rng, n, spec.output_median, spec.output_sigma, spec.output_clip)
    if spec.rate:
        # A separate stream, so the online run serves exactly the offline run's requests.
        arrivals = np.cumsum(np.random.default_rng([spec.seed, 1]).exponential(1.0 / spec.rate, size=n))
        arrivals -= arrivals[0]  # the first request arrives when the clock starts
    else:
        arrivals = np.zeros(n)
    return [Request(f"r{i}", prefix + rng.choice(tokens, size=int(p)).tolist(), int(o), float(a))
            for i, (p, o, a) in enumerate(zip(prompt_lens, output_lens, arrivals))]


def distribution_means(spec: WorkloadSpec, samples: int = 200_000) -> dict:
    """Mean prompt and output lengths of the clipped distributions (Monte Carlo, fixed seed)."""
    rng = np.random.default_rng(12345)
    prompt = _lengths(rng, samples, spec.prompt_median, spec.prompt_sigma, spec.prompt_clip)
    output = _lengths(rng, samples, spec.output_median, spec.output_sigma, spec.output_clip)
    return {"prompt_mean": round(float(prompt.mean()), 1), "output_mean": round(float(output.mean()), 1)}


def describe(requests: list[Request]) -> dict:
    """What was actually drawn: counts and means of this workload."""
    prompts = [len(r.prompt_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    return {"requests": len(requests), "prompt_tokens": sum(prompts), "output_tokens": sum(outputs),
            "prompt_mean": round(sum(prompts) / len(prompts), 1), "output_mean": round(sum(outputs) / len(outputs), 1),
            "prompt_max": max(prompts), "output_max": max(outputs),
            "last_arrival_s": round(max(r.arrival for r in requests), 3)}
