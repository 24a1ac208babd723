"""The two pieces of the HTTP front that work at the ASGI level, below FastAPI: bounds on reading a request's
body (its size and the time it may take), and the server-sent-event response that streams a generation.

Both exist for the hostile-client promises the socket server makes too: a request's body is bounded in size,
a client that starts a request must finish sending it within the read timeout, a client that stops reading
its stream is dropped after the write timeout, and a client that goes away aborts its request at once (so
its KV blocks return to the pool).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("kvmux.serve.http")


async def disconnected(receive: Receive) -> None:
    """Return when the client has gone away. Call only once the request's body has been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


def body_limits(app: ASGIApp, max_bytes: int, timeout: float, refusal: Callable[[int], dict]) -> ASGIApp:
    """ASGI middleware bounding a request's body: at most `max_bytes` (else 413), all of it within `timeout`
    seconds of the request's start (else 408). A refused request gets refusal(status) as its JSON body, the
    connection is closed, and the app sees the client disconnect."""
    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reading, answered, received = True, False, 0

        async def refuse(status: int) -> Message:
            nonlocal answered
            answered = True
            body = json.dumps(refusal(status)).encode()
            await send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return {"type": "http.disconnect"}

        async def limited_receive() -> Message:
            nonlocal reading, received
            if answered:
                return {"type": "http.disconnect"}
            if not reading:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await refuse(408)
            received += len(message.get("body", b""))
            if received > max_bytes:
                return await refuse(413)
            reading = message["type"] == "http.request" and message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:  # the app's own answer to a request already refused goes nowhere
                await send(message)

        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            await refuse(413)
            return
        await app(scope, limited_receive, guarded_send)
    return guarded


class EventStream(Response):
    """A `text/event-stream` answer: each string `events` yields is sent as one `data:` event.

    It ends when the events do, when the client disconnects, or when one write waits longer than
    `write_timeout` for the client to read; in the last two cases the events are closed early, which aborts
    the request behind them, and the connection is dropped.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], write_timeout: float) -> None:
        # Not Response.__init__: that would declare a content-length for a body that is a stream.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events = events
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        writer = asyncio.ensure_future(self._write(send))
        watcher = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, watcher):
                task.cancel()
            failure, _ = await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.events.aclose()
        if isinstance(failure, Exception) and not isinstance(failure, asyncio.TimeoutError):
            log.error("an event stream failed", exc_info=failure)

    async def _write(self, send: Send) -> None:
        async for event in self.events:
            await asyncio.wait_for(send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(),
                                         "more_body": True}), self.write_timeout)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
