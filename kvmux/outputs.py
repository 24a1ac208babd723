"""What callers get back: streamed deltas, collected completions, and errors; and what listeners to the engine
get once a request has ended (its timeline)."""
from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass, field


class KvmuxError(Exception):
    """An error with a stable code, e.g. prompt_too_long, overloaded, invalid_params."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RequestRejected(KvmuxError):
    """Admission refused the request; nothing was computed for it."""


@dataclass
class RequestOutput:
    """One streamed piece of a request: the tokens and text new since the previous piece."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # stop, length, abort, error; None while running
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    # Which of the request's n parallel samples this piece belongs to; with
    # n > 1, `finished` means this sample is done, and the request is done
    # when all n are.
    index: int = 0
    # With SamplingParams.logprobs set, one entry per token of token_ids: its log-probability under the
    # distribution it was drawn from, and that distribution's likeliest tokens as [token id, logprob]
    # pairs, likeliest first (SamplingParams.logprobs of them, fewer if the filters left fewer). None otherwise.
    logprobs: list[float] | None = None
    top_logprobs: list[list[list]] | None = None


@dataclass
class Completion:
    """A whole request's result.

    With n > 1 parallel samples the fields describe sample 0 and `samples`
    lists every sample (this one first) in index order.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    index: int = 0
    logprobs: list[float] | None = None  # as in RequestOutput, for every token of token_ids
    top_logprobs: list[list[list]] | None = None
    others: list[Completion] = field(default_factory=list, repr=False)  # samples 1..n-1

    @property
    def samples(self) -> list[Completion]:
        return [self, *self.others]

    @classmethod
    async def collect(cls, outputs: AsyncIterable[RequestOutput]) -> Completion:
        """The whole result of a request's stream of outputs."""
        result = None
        async for out in outputs:
            result = result or cls(out.request_id)
            result.add(out)
        return result

    def add(self, out: RequestOutput) -> None:
        while len(self.others) < out.index:
            self.others.append(Completion(self.request_id, index=len(self.others) + 1))
        target = self.samples[out.index]
        target.text += out.text
        target.token_ids += out.token_ids
        target.finish_reason = out.finish_reason
        target.num_prompt_tokens = out.num_prompt_tokens
        target.num_output_tokens = out.num_output_tokens
        target.error = out.error
        if out.logprobs is not None:
            if target.logprobs is None:
                target.logprobs, target.top_logprobs = [], []
            target.logprobs += out.logprobs
            target.top_logprobs += out.top_logprobs


@dataclass
class RequestRecord:
    """One request's timeline, told to listeners once it has ended or was refused. Times are seconds
    since its arrival, as the router saw its outputs."""

    request_id: str
    arrival: float  # time.monotonic()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # over all samples
    longest_sample: int = 0  # output tokens of its longest sample
    queue_s: float | None = None  # until prefill first gave it blocks
    first_token_s: float | None = None
    last_token_s: float | None = None
    end_s: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)  # one per sample
    rejected: str | None = None  # admission's code, when it was refused
