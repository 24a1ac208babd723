"""How a request samples: SamplingParams, which every interface (asyncio API, socket, HTTP, CLI) shares.

Imports nothing heavy, so the client side can use it without torch; the sampler that applies these
parameters to logits is kvmux/engine/sampler.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_N = 64  # most parallel samples one request may ask for
MAX_LOGPROBS = 20  # most alternatives returned with each sampled token's log-probability
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY], as in OpenAI's API
SEED_RANGE = (-(2**63), 2**63 - 1)  # what a seed may be: a signed 64-bit integer, as every wire carries it


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How one request samples. temperature 0 means greedy.

    The token is drawn from the logits after, in this order: presence and frequency penalties (on the
    sample's own output tokens so far), temperature, top_k, top_p and min_p. logprobs (the sampled
    token's log-probability and its likeliest alternatives) come from that same final distribution;
    a greedy request's from the penalized logits at temperature 1 (its argmax does not depend on the
    temperature or the filters).
    """

    max_tokens: int | None = 128  # None: as many as the context (and the KV pool) leave after the prompt
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest one; 0: off
    presence_penalty: float = 0.0  # subtracted from the logit of every token the sample has produced
    frequency_penalty: float = 0.0  # subtracted once per time the sample has produced the token
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # parallel samples of one prompt: it is prefilled once and its blocks are shared
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, with its k likeliest alternatives

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
                                         and self.max_tokens >= 1), "max_tokens must be an integer >= 1 or None"),
            (_number(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (_number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1] (0 disables it)"),
            (_number(self.presence_penalty) and abs(self.presence_penalty) <= MAX_PENALTY,
             f"presence_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (_number(self.frequency_penalty) and abs(self.frequency_penalty) <= MAX_PENALTY,
             f"frequency_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (self.seed is None or (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             "seed must be a signed 64-bit integer or None"),
            (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "stop must be a list of non-empty strings"),
            (isinstance(self.stop_token_ids, list) and all(isinstance(t, int) for t in self.stop_token_ids),
             "stop_token_ids must be a list of integers"),
            (isinstance(self.n, int) and not isinstance(self.n, bool) and 1 <= self.n <= MAX_N,
             f"n must be an integer in [1, {MAX_N}]"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                       and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def num_samples(n) -> int:
    """How many samples (and so finished outputs) a request with this `n` has: an invalid n counts as one,
    since admission rejects it with a single error."""
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_N else 1
