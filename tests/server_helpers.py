"""What server tests share: in-process socket and HTTP servers on a background loop, and a raw frame socket."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile

import msgpack
import openai

from kvmux import Engine
from kvmux.loop_thread import LoopThread
from kvmux.serve import protocol
from kvmux.serve.http import HttpOptions, HttpServer
from kvmux.serve.server import Server, ServerOptions

from engine_helpers import PROMPT, ForwardGate, greedy, settled, wire

# A small pool, two seats and small prompt chunks, so that waiting, prefilling and preemption are easy to reach.
SMALL = {"num_blocks": 8, "block_size": 8, "max_num_seqs": 2, "max_num_batched_tokens": 8, "max_pending": 16,
         "enable_prefix_caching": False}
# Unix socket paths are limited to 107 bytes and pytest's tmp_path can be longer; sockets go here instead.
SOCKETS = tempfile.TemporaryDirectory(prefix="kvx-", dir="/tmp")


def short_dir() -> str:
    return tempfile.mkdtemp(dir=SOCKETS.name)


def serve_http(*args: str) -> tuple[subprocess.Popen, str]:
    """`kvmux serve --port 0 ARGS` in a process of its own, and its API's base URL once it serves HTTP."""
    server = subprocess.Popen([sys.executable, "-m", "kvmux", "serve", "--port", "0", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while True:
        line = server.stdout.readline()
        if not line:
            server.kill()
            raise AssertionError(f"the server exited before it served HTTP (exit code {server.wait()})")
        if "http://" in line:
            return server, line.split()[line.split().index("on") + 1]


class EngineThread:
    """An Engine on an event loop in a background thread, so tests can be plain clients of its servers."""

    def __init__(self, model: str, engine_options: dict | None = None) -> None:
        self.loop = LoopThread("kvmux-test-server")
        self.engine = Engine(model, **{"num_blocks": 64, "block_size": 8, "max_pending": 4, "dtype": "float32",
                                     **(engine_options or {})})
        self.call(self.engine.start())

    def call(self, coro, timeout: float = 60):
        return self.loop.run(coro, timeout)

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


class Served(EngineThread):
    """An Engine and a socket Server on a background loop."""

    def __init__(self, model: str, engine_options: dict | None = None, **server_options) -> None:
        super().__init__(model, engine_options)
        self.path = os.path.join(short_dir(), "s.sock")
        self.server = self.start_server(self.path, **{"read_timeout": 0.5, "max_frame": 4096, **server_options})

    def start_server(self, path: str, **options) -> Server:
        server = Server(self.engine, ServerOptions(path, **options))
        self.call(server.start())
        return server


class ServedHttp(EngineThread):
    """An Engine and an HTTP server (OpenAI's API) on a background loop, on a free loopback port."""

    def __init__(self, model: str, engine_options: dict | None = None, **http_options) -> None:
        super().__init__(model, {"num_blocks": 128, "max_pending": 256, **(engine_options or {})})
        self.server = HttpServer(self.engine, HttpOptions(port=0, **http_options))
        self.call(self.server.start())
        self.url = f"http://127.0.0.1:{self.server.port}"

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(**{"base_url": self.url + "/v1", "api_key": "unused", "max_retries": 0, **options})

    def async_client(self, **options) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(**{"base_url": self.url + "/v1", "api_key": "unused", "max_retries": 0, **options})


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


def step_until(served, gate: ForwardGate, predicate) -> dict:
    """Let forwards through one at a time until predicate(stats) holds at a held forward."""
    gate.wait_held()
    while not predicate(stats := served.stats()):
        gate.allow(1)
        gate.wait_held()
    return stats


def start_pair(served, gate: ForwardGate) -> tuple[Raw, Raw]:
    """On a SMALL engine, two sequences of 7 + 40 tokens need 6 blocks each of the 8: the later one ("b") is
    preempted as they grow."""
    first, second = Raw(served.path), Raw(served.path)
    first.send({"op": "generate", "id": "a", "prompt": PROMPT, "params": wire(greedy(40))})
    step_until(served, gate, lambda s: s["running"] == 1)
    second.send({"op": "generate", "id": "b", "prompt": PROMPT[::-1], "params": wire(greedy(40))})
    return first, second
