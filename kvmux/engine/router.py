"""The router: the engine's own inbox, delivering outputs to each request's stream and merging statistics."""
from __future__ import annotations

import asyncio

from kvmux.engine import messages
from kvmux.engine.actor import Actor
from kvmux.outputs import RequestOutput, RequestRejected


class Router(Actor):
    name = "router"

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, asyncio.Queue] = {}
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
                    stream.put_nowait(RequestOutput(
                        out.request_id, out.token_ids, out.text, out.finish_reason is not None, out.finish_reason,
                        out.num_prompt_tokens, out.num_output_tokens, out.error, out.index))
            if finished:
                self.admission.send(messages.Finished(finished))
        elif isinstance(message, messages.Rejected):
            self.samples_left.pop(message.request_id, None)
            stream = self.streams.get(message.request_id)
            if stream is not None:
                stream.put_nowait(RequestRejected(message.code, message.message))
        elif isinstance(message, messages.StatsReply):
            future, merged, pending = self.queries[message.query_id]
            merged.update(message.stats)
            pending.discard(message.actor)
            if not pending and not future.done():
                future.set_result(merged)
