"""The router: the engine's own inbox, delivering outputs to each request's stream, merging statistics,
and keeping each request's timeline for whoever listens (the HTTP server's Prometheus metrics)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmux.engine import messages
from kvmux.engine.actor import Actor, log
from kvmux.outputs import RequestOutput, RequestRejected


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


class Router(Actor):
    name = "router"

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, asyncio.Queue] = {}
        self.samples_left: dict[str, int] = {}  # request id -> parallel samples not yet finished
        self.queries: dict[int, tuple[asyncio.Future, dict, set]] = {}  # id -> (result, merged, actors yet to reply)
        self.admission: Actor | None = None  # wired by the engine
        self.records: dict[str, RequestRecord] = {}  # requests in flight
        self.listeners: list[Callable[[RequestRecord], None]] = []

    def track(self, request_id: str, arrival: float) -> None:
        # An id admission still holds (its caller left) keeps its record; the new request is refused as a duplicate.
        self.records.setdefault(request_id, RequestRecord(request_id, arrival))

    async def handle(self, message) -> None:
        if isinstance(message, messages.StepOutputs):
            now = time.monotonic()
            finished = []
            for out in message.outputs:
                self._note(out, now)
                # A request ends when the last of its n samples does.
                if out.finish_reason is not None:
                    left = self.samples_left.pop(out.request_id, 1) - 1
                    if left > 0:
                        self.samples_left[out.request_id] = left
                    else:
                        finished.append(out.request_id)
                        self._close(out.request_id, now)
                stream = self.streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(RequestOutput(
                        out.request_id, out.token_ids, out.text, out.finish_reason is not None, out.finish_reason,
                        out.num_prompt_tokens, out.num_output_tokens, out.error, out.index, out.logprobs,
                        out.top_logprobs))
            if finished:
                self.admission.send(messages.Finished(finished))
        elif isinstance(message, messages.Rejected):
            self.samples_left.pop(message.request_id, None)
            record = self.records.get(message.request_id)
            if record is not None and message.code != "duplicate_request_id":
                record.rejected = message.code
                self._close(message.request_id, time.monotonic())
            stream = self.streams.get(message.request_id)
            if stream is not None:
                stream.put_nowait(RequestRejected(message.code, message.message))
        elif isinstance(message, messages.StatsReply):
            future, merged, pending = self.queries[message.query_id]
            merged.update(message.stats)
            pending.discard(message.actor)
            if not pending and not future.done():
                future.set_result(merged)

    def _note(self, out: messages.SeqOutput, now: float) -> None:
        record = self.records.get(out.request_id)
        if record is None:
            return
        record.num_prompt_tokens = out.num_prompt_tokens
        if out.queue_s is not None:
            record.queue_s = out.queue_s
        if out.token_ids:
            if record.first_token_s is None:
                record.first_token_s = now - record.arrival
            record.last_token_s = now - record.arrival
        if out.finish_reason is not None:
            record.finish_reasons.append(out.finish_reason)
            record.num_output_tokens += out.num_output_tokens
            record.longest_sample = max(record.longest_sample, out.num_output_tokens)

    def _close(self, request_id: str, now: float) -> None:
        record = self.records.pop(request_id, None)
        if record is None:
            return
        record.end_s = now - record.arrival
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the outputs
                log.exception("request listener %r failed", listener)
