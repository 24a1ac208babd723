"""The sampler: one token per row of logits, each row with its own parameters and random stream."""
from __future__ import annotations

import torch

from kvmux.sampling import SamplingParams

_MIN_TEMPERATURE = 1e-30  # well above float32's smallest normal, far below any useful value

# Seeds are mixed with the token index so that each step draws from its own
# stream: the draw depends only on (seed, step), never on batch composition or
# on whether the sequence was preempted and recomputed in between.
_STEP_MIX = 0x9E3779B97F4A7C15


def step_seed(seed: int, step: int) -> int:
    return (seed * 6364136223846793005 + step * _STEP_MIX) & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(seed: int, index: int) -> int:
    """Seed of parallel sample `index`: sample 0 keeps the request's seed, so it equals an n=1 request."""
    if index == 0:
        return seed
    # A different multiplier from step_seed, so sample streams never line up with step streams.
    return ((seed ^ 0x5DEECE66D) * 0xD1B54A32D192ED03 + index * _STEP_MIX) & 0x7FFF_FFFF_FFFF_FFFF


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> list[int]:
    """Pick one token per row of logits [K, vocab]; seeds/steps give each row its random stream."""
    out = logits.argmax(dim=-1).tolist()
    generator = torch.Generator(device=logits.device)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float()
        # Shift the top logit to 0 and divide by at least a float32-representable temperature: a tiny one
        # then sends the rest to -inf (greedy) instead of making inf/NaN probabilities, which would fail
        # the whole batch's step and so hurt every other request in it.
        row = (row - row.max()) / max(p.temperature, _MIN_TEMPERATURE)
        if p.top_k and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        generator.manual_seed(step_seed(seeds[i], steps[i]))
        out[i] = int(torch.multinomial(probs, 1, generator=generator))
    return out
