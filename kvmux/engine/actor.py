"""An actor: an asyncio task that owns its state and reads msgpack messages from its own queue."""
from __future__ import annotations

import asyncio
import logging

from kvmux.engine import messages

log = logging.getLogger("kvmux")


class Actor:
    name = "actor"

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    def send(self, message) -> None:
        self.inbox.put_nowait(messages.pack(message))

    async def receive(self):
        return messages.unpack(await self.inbox.get())

    def receive_nowait(self):
        return messages.unpack(self.inbox.get_nowait())

    async def run(self) -> None:
        """Handle messages one at a time until Shutdown.

        A failure while handling one message is that message's failure: it is
        reported through on_error and the actor goes on serving the rest.
        """
        while True:
            message = await self.receive()
            if isinstance(message, messages.Shutdown):
                return
            try:
                await self.handle(message)
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the actor
                log.exception("%s failed handling %s", self.name, type(message).__name__)
                self.on_error(message, exc)
            del message  # waiting for the next one, an actor holds none (a refused Submit can be large)

    async def handle(self, message) -> None:
        raise NotImplementedError

    def on_error(self, message, exc: Exception) -> None:
        """Fail whatever request the message concerned; actors override it."""
