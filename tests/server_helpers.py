"""What server tests share: an in-process server on a background loop, and a raw frame socket."""
from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import msgpack

from kvmux import Engine
from kvmux.engine.loop_thread import LoopThread
from kvmux.serve import protocol
from kvmux.serve.server import Server, ServerOptions

from engine_helpers import settled

# Unix socket paths are limited to 107 bytes and pytest's tmp_path can be longer; sockets go here instead.
SOCKETS = tempfile.TemporaryDirectory(prefix="kvx-", dir="/tmp")


def short_dir() -> str:
    return tempfile.mkdtemp(dir=SOCKETS.name)


class Served:
    """An Engine and a Server on an event loop in a background thread, so tests can be plain clients."""

    def __init__(self, model: str, engine_options: dict | None = None, **server_options) -> None:
        self.loop = LoopThread("kvmux-test-server")
        self.path = os.path.join(short_dir(), "s.sock")
        self.engine = Engine(model, **{"num_blocks": 64, "block_size": 8, "max_pending": 4, "dtype": "float32",
                                     **(engine_options or {})})
        self.call(self.engine.start())
        self.server = self.start_server(self.path, **{"read_timeout": 0.5, "max_frame": 4096, **server_options})

    def call(self, coro, timeout: float = 60):
        return self.loop.run(coro, timeout)

    def start_server(self, path: str, **options) -> Server:
        server = Server(self.engine, ServerOptions(path, **options))
        self.call(server.start())
        return server

    def stats(self) -> dict:
        return self.call(self.engine.stats())

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        """Poll the engine's statistics until predicate(stats) holds; returns them."""
        async def poll():
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                stats = await self.engine.stats()
                if predicate(stats):
                    return stats
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"never reached: last stats {stats}")
                await asyncio.sleep(0.002)
        return self.call(poll(), timeout + 10)

    def settle(self) -> None:
        """Wait until no request is live or in flight on the server, then check nothing leaked on any tier."""
        self.call(settled(self.engine, busy=self.server.in_flight))

    def close(self) -> None:
        self.call(self.server.shutdown())
        self.call(self.engine.stop())
        self.loop.close()


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
