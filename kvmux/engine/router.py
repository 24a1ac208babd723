"""The router: the engine's own inbox, delivering outputs to each request's stream, merging statistics,
and keeping each request's timeline for whoever listens (the HTTP server's Prometheus metrics)."""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from kvmux.engine import messages
from kvmux.engine.actor import Actor, log
from kvmux.outputs import RequestOutput, RequestRecord, RequestRejected


class OutputStream:
    """A request's outputs on their way to its caller.

    Pieces the caller has not taken yet are merged, sample by sample, so a caller that reads slowly (a socket
    client that has stopped reading, say) gets larger pieces, never more of them: what waits here is at most
    the request's own tokens and text, however far the caller lags.
    """

    def __init__(self) -> None:
        self._items: deque[RequestOutput | Exception] = deque()
        self._unread: dict[int, RequestOutput] = {}  # sample index -> its piece still in _items
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | Exception) -> None:
        if isinstance(item, RequestOutput):
            waiting = self._unread.get(item.index)
            if waiting is not None:
                waiting.token_ids += item.token_ids
                waiting.text += item.text
                if item.logprobs is not None:
                    waiting.logprobs = (waiting.logprobs or []) + item.logprobs
                    waiting.top_logprobs = (waiting.top_logprobs or []) + (item.top_logprobs or [])
                waiting.finished, waiting.finish_reason, waiting.error = item.finished, item.finish_reason, item.error
                waiting.num_output_tokens = item.num_output_tokens
                return
            self._unread[item.index] = item
        self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput | Exception:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, RequestOutput) and self._unread.get(item.index) is item:
            del self._unread[item.index]
        return item


class Router(Actor):
    name = "router"

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, OutputStream] = {}
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
                    stream.put(RequestOutput(
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
                stream.put(RequestRejected(message.code, message.message))
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
