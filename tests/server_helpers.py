"""Shared helpers for server tests: an in-process server on a background loop, and a raw frame socket."""
from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading

import msgpack

from bench.soak import leaks_of
from kvmux.serve import protocol
from kvmux.engine.supervisor import Engine
from kvmux.serve.server import Server, ServerOptions

# Unix socket paths are limited to 107 bytes and pytest's tmp_path can be longer; sockets go here instead.
SOCKETS = tempfile.TemporaryDirectory(prefix="kvx-", dir="/tmp")


def short_dir() -> str:
    return tempfile.mkdtemp(dir=SOCKETS.name)


class Served:
    """An Engine and a Server on an event loop in a background thread, so tests can be plain clients."""

    def __init__(self, model: str, engine_options: dict | None = None, **server_options) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.path = os.path.join(short_dir(), "s.sock")
        self.engine = Engine(model, **{"num_blocks": 64, "block_size": 8, "max_pending": 4, **(engine_options or {})})
        self.call(self.engine.start())
        self.server = self.start_server(self.path, **{"read_timeout": 0.5, "max_frame": 4096, **server_options})

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def start_server(self, path: str, **options) -> Server:
        server = Server(self.engine, ServerOptions(path, **options))
        self.call(server.start())
        return server

    def stats(self) -> dict:
        return self.call(self.engine.stats())

    def settle(self) -> None:
        """Wait until no request is live and every tier is whole, then check the allocator's invariants."""
        async def settled():
            for _ in range(1000):
                stats = await self.engine.stats()
                if not stats["requests_live"] and not any(leaks_of(stats).values()) and self.server.in_flight() == 0:
                    break
                await asyncio.sleep(0.01)
            assert not any(leaks_of(stats).values()), f"leaked: {leaks_of(stats)}"
            assert stats["requests_live"] == 0
            self.engine.blocks.check_invariants()
            assert self.server.in_flight() == 0
        self.call(settled())

    def close(self) -> None:
        self.call(self.server.shutdown())
        self.call(self.engine.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


class Raw:
    """A bare socket speaking frames, for what the client library never sends."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def send(self, message) -> None:
        self.send_bytes(msgpack.packb(message))

    def send_bytes(self, body: bytes) -> None:
        self.sock.sendall(protocol.HEADER.pack(len(body)) + body)

    def recv(self) -> dict | None:
        header = self._exactly(4)
        if header is None:
            return None
        return msgpack.unpackb(self._exactly(protocol.HEADER.unpack(header)[0]))

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def until_finished(self, *request_ids: str) -> dict:
        """Read frames until each of request_ids has ended; the last frame of the first one (or of all, by id)."""
        last = {}
        while len(last) < len(request_ids):
            frame = self.recv()
            if frame["id"] in request_ids and (frame["type"] == "error" or frame["finished"]):
                last[frame["id"]] = frame
        return last[request_ids[0]] if len(request_ids) == 1 else last

    def close(self) -> None:
        self.sock.close()
