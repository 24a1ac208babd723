"""The router: the engine's own inbox, delivering outputs to each request's stream and merging statistics."""
from __future__ import annotations

import asyncio
from collections import deque

from kvmux.engine import messages
from kvmux.engine.actor import Actor
from kvmux.outputs import RequestOutput, RequestRejected


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

    async def handle(self, message) -> None:
        if isinstance(message, messages.StepOutputs):
            finished = []
            for out in message.outputs:
                # A request ends when the last of its n samples does.
                if out.finish_reason is not None:
                    left = self.samples_left.pop(out.request_id, 1) - 1
                    if left > 0:
                        self.samples_left[out.request_id] = left
                    else:
                        finished.append(out.request_id)
                stream = self.streams.get(out.request_id)
                if stream is not None:
                    stream.put(RequestOutput(
                        out.request_id, out.token_ids, out.text, out.finish_reason is not None, out.finish_reason,
                        out.num_prompt_tokens, out.num_output_tokens, out.error, out.index))
            if finished:
                self.admission.send(messages.Finished(finished))
        elif isinstance(message, messages.Rejected):
            self.samples_left.pop(message.request_id, None)
            stream = self.streams.get(message.request_id)
            if stream is not None:
                stream.put(RequestRejected(message.code, message.message))
        elif isinstance(message, messages.StatsReply):
            future, merged, pending = self.queries[message.query_id]
            merged.update(message.stats)
            pending.discard(message.actor)
            if not pending and not future.done():
                future.set_result(merged)
