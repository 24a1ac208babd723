"""How a request samples: SamplingParams, which every interface (asyncio API, socket, CLI) shares.

Imports nothing heavy, so the client side can use it without torch; the sampler that applies these
parameters to logits is kvmux/engine/sampler.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_N = 64  # most parallel samples one request may ask for
DEFAULT_MAX_TOKENS = 256  # output tokens of a request that does not say, fewer where the context runs out first
# What one request's lists may hold. Every front end (socket, HTTP, the Python API) is held to them here, so a
# request pins a bounded amount of memory for its whole life, and its stop checks cost a bounded time per token.
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters of one stop string (the stream holds back up to this much text)
MAX_STOP_TOKEN_IDS = 1024  # stop token ids
TOKEN_ID_LIMIT = 2**31  # token ids are below this (admission stores them as 4-byte ints)


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
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)

    def _checks(self):
        """(condition, what is wrong) in order, made lazily, so that each check may rely on those before it."""
        yield (self.max_tokens is None or isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
               and self.max_tokens >= 1, "max_tokens must be an integer >= 1 (or None for the default)")
        yield isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature must be >= 0"
        yield isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"
        yield isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"
        yield self.seed is None or isinstance(self.seed, int), "seed must be an integer or None"
        yield (isinstance(self.stop, list) and len(self.stop) <= MAX_STOP,
               f"stop must be a list of at most {MAX_STOP} strings")
        yield (all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
               f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters")
        yield (isinstance(self.stop_token_ids, list) and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
               f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
        yield (all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < TOKEN_ID_LIMIT
                   for t in self.stop_token_ids), f"stop_token_ids must be integers in [0, {TOKEN_ID_LIMIT})")
        yield (isinstance(self.n, int) and not isinstance(self.n, bool) and 1 <= self.n <= MAX_N,
               f"n must be an integer in [1, {MAX_N}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def num_samples(n) -> int:
    """How many samples (and so finished outputs) a request with this `n` has: an invalid n counts as one,
    since admission rejects it with a single error."""
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_N else 1
