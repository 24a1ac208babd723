"""How a request samples: SamplingParams, which every interface (asyncio API, socket, CLI) shares.

Imports nothing heavy, so the client side can use it without torch; the sampler that applies these
parameters to logits is kvmux/engine/sampler.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_N = 64  # most parallel samples one request may ask for
DEFAULT_MAX_TOKENS = 256  # output tokens of a request that does not say, fewer where the context runs out first


@dataclass
class SamplingParams:
    """How one request samples. temperature 0 means greedy.

    The defaults are every interface's (Python, socket, command line): a
    moderate temperature cut to the likeliest tokens, as llama.cpp samples,
    and max_tokens None: DEFAULT_MAX_TOKENS, or what is left of the context
    after the prompt if that is less.
    """

    max_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # parallel samples of one prompt: it is prefilled once and its blocks are shared

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            (self.max_tokens is None or isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
             and self.max_tokens >= 1, "max_tokens must be an integer >= 1 (or None for the default)"),
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


def num_samples(n) -> int:
    """How many samples (and so finished outputs) a request with this `n` has: an invalid n counts as one,
    since admission rejects it with a single error."""
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_N else 1
