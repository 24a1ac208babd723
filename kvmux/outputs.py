"""What callers get back: streamed deltas, collected completions, and errors."""
from __future__ import annotations

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


@dataclass
class Completion:
    """A whole request's result."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.finish_reason = out.finish_reason
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens
        self.error = out.error
