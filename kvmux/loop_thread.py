"""An asyncio event loop in a background thread: how blocking code (LLM, Client, tests) drives async code."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading


class LoopThread:
    """Runs an event loop in a daemon thread until `close()`.

        loop = LoopThread("kvmux-loop")
        result = loop.run(some_coroutine())
        loop.close()
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        """Schedule a coroutine on the loop; its result arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the loop and wait for its result (or exception)."""
        return self.submit(coro).result(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the loop and its thread; tasks still pending are dropped with it."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()
