"""How a request samples: SamplingParams, which every interface (asyncio API, socket, HTTP, CLI) shares.

Imports nothing heavy, so the client side can use it without torch; the sampler that applies these
parameters to logits is kvmux/runner/sampler.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_N = 64  # most parallel samples one request may ask for
MAX_LOGPROBS = 20  # most alternatives returned with each sampled token's log-probability
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY], as in OpenAI's API
SEED_RANGE = (-(2**63), 2**63 - 1)  # what a seed may be: a signed 64-bit integer, as every wire carries it
# What one request's lists may hold. Every front end (socket, HTTP, the Python API) is held to them here, so a
# request pins a bounded amount of memory for its whole life, and its stop checks cost a bounded time per token.
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters of one stop string (the stream holds back up to this much text)
MAX_STOP_TOKEN_IDS = 1024  # stop token ids
TOKEN_ID_LIMIT = 2**31  # token ids are below this (admission stores them as 4-byte ints)
MAX_CHOICES = 256  # strings of a structured_outputs choice
CONSTRAINT_FIELDS = ("json", "json_object", "regex", "choice", "grammar")  # StructuredOutputs' fields


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class StructuredOutputs:
    """What a request's output must be, named as vLLM's StructuredOutputsParams: exactly one field is set.

    Every token the constraint forbids is masked before any other sampling step, end-of-sequence is allowed
    only where the output is complete, and a sample whose output can grow no further ends with finish_reason
    "stop". max_tokens may still cut it short ("length"), mid-structure. The engine compiles the constraint with
    llguidance and refuses one that does not compile, or is too large or too slow to, as invalid_params.
    """

    json: dict | str | None = None  # a JSON schema (draft 2020-12, as llguidance supports it), or its text
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches it
    choice: list[str] | None = None  # the output is one of these strings
    grammar: str | None = None  # a Lark grammar, or llama.cpp's GBNF

    @classmethod
    def from_map(cls, fields: dict) -> StructuredOutputs:
        """From a map of its fields, as the socket and HTTP carry it; ValueError names a field it does not have."""
        unknown = sorted(set(fields) - set(CONSTRAINT_FIELDS), key=repr)
        if unknown:
            raise ValueError(f"structured_outputs has no field(s) {', '.join(map(repr, unknown))}; its fields are "
                             f"{', '.join(CONSTRAINT_FIELDS)}")
        return cls(**fields)

    def fields_set(self) -> list[str]:
        return [name for name in CONSTRAINT_FIELDS if getattr(self, name) not in (None, False)]

    def problem(self) -> str | None:
        """What makes it unusable before it is compiled (several fields set, a wrong type), or None."""
        set_ = self.fields_set()
        if len(set_) != 1:
            return (f"structured_outputs must set exactly one of json, json_object, regex, choice, grammar "
                    f"(it sets {', '.join(set_) or 'none'})")
        if not isinstance(self.json, (dict, str, type(None))):
            return "structured_outputs.json must be a JSON schema: an object, or its text"
        if not isinstance(self.json_object, bool):
            return "structured_outputs.json_object must be true or false"
        for name in ("regex", "grammar"):
            if not isinstance(getattr(self, name), (str, type(None))) or getattr(self, name) == "":
                return f"structured_outputs.{name} must be a non-empty string"
        if self.choice is not None and not (
                isinstance(self.choice, list) and 0 < len(self.choice) <= MAX_CHOICES
                and all(isinstance(c, str) and c for c in self.choice)):
            return f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} non-empty strings"
        return None


@dataclass
class SamplingParams:
    """How one request samples. temperature 0 means greedy.

    The defaults are every interface's (Python, socket, HTTP, command line): a moderate temperature cut to
    the likeliest tokens, as llama.cpp samples, and no cap on the output but the context: a request that
    does not set max_tokens runs until it stops or the context (or the KV pool) is full.

    The token is drawn from the logits after, in this order: presence and frequency penalties (on the
    sample's own output tokens so far), temperature, top_k, top_p and min_p. logprobs (the sampled
    token's log-probability and its likeliest alternatives) come from that same final distribution;
    a greedy request's from the penalized logits at temperature 1 (its argmax does not depend on the
    temperature or the filters).
    """

    max_tokens: int | None = None  # None: as many as the context (and the KV pool) leave after the prompt
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest one; 0: off
    presence_penalty: float = 0.0  # subtracted from the logit of every token the sample has produced
    frequency_penalty: float = 0.0  # subtracted once per time the sample has produced the token
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # parallel samples of one prompt: it is prefilled once and its blocks are shared
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, with its k likeliest alternatives
    structured_outputs: StructuredOutputs | None = None  # a constraint on the output (JSON, regex, choice, grammar)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)

    def _checks(self):
        """(condition, what is wrong) in order, made lazily, so that each check may rely on those before it."""
        yield (self.max_tokens is None or (isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
                                           and self.max_tokens >= 1), "max_tokens must be an integer >= 1 or None")
        yield _number(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"
        yield isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"
        yield _number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"
        yield _number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1] (0 disables it)"
        yield (_number(self.presence_penalty) and abs(self.presence_penalty) <= MAX_PENALTY,
               f"presence_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        yield (_number(self.frequency_penalty) and abs(self.frequency_penalty) <= MAX_PENALTY,
               f"frequency_penalty must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        yield (self.seed is None or (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
               "seed must be a signed 64-bit integer or None")
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
        yield (self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}]")
        constraint = self.structured_outputs
        yield (constraint is None or isinstance(constraint, StructuredOutputs),
               "structured_outputs must be None or a StructuredOutputs")
        problem = constraint and constraint.problem()
        yield not problem, problem

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
