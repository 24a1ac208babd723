"""Sampling parameters and the sampler that turns logits into next tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_N = 64  # most parallel samples one request may ask for
_MIN_TEMPERATURE = 1e-30  # well above float32's smallest normal, far below any useful value


@dataclass
class SamplingParams:
    """How one request samples. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # parallel samples of one prompt: it is prefilled once and its blocks are shared

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer or None"),
            (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "stop must be a list of non-empty strings"),
            (isinstance(self.stop_token_ids, list) and all(isinstance(t, int) for t in self.stop_token_ids),
             "stop_token_ids must be a list of integers"),
            (isinstance(self.n, int) and not isinstance(self.n, bool) and 1 <= self.n <= MAX_N,
             f"n must be an integer in [1, {MAX_N}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
