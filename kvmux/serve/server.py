"""The Unix-socket server: many connections, many requests per connection, each a stream of frames.

Each connection has one reader loop and one task per request in flight; the
tasks share the connection's writer under a lock, so frames of different
requests interleave but never split. docs/protocol.md describes the wire.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass

from kvmux.engine.supervisor import Engine
from kvmux.outputs import KvmuxError
from kvmux.sampling import SamplingParams, num_samples
from kvmux.serve import protocol, unix_socket

log = logging.getLogger("kvmux.serve.server")


@dataclass
class ServerOptions:
    socket_path: str
    socket_mode: int = 0o600
    max_frame: int = protocol.DEFAULT_MAX_FRAME
    read_timeout: float = protocol.DEFAULT_READ_TIMEOUT
    grace_period: float = 10.0  # seconds in-flight requests get to finish on shutdown before they are aborted
    # Requests one connection may have in flight (generate, stats, health, model; an abort is answered at once
    # and never refused); more get too_many_requests. Bounds what one client can hold of the engine's
    # max_pending, and the tasks and buffers the server keeps for it.
    max_inflight_per_connection: int = 256
    # Seconds a write may wait for the client to read. A client that stops reading would otherwise hold its
    # requests' tasks and output buffers forever; past this it is disconnected and its requests aborted.
    write_timeout: float = 60.0


class Connection:
    def __init__(self, server: "Server", number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.number = number
        self.reader = reader
        self.writer = writer
        self.write_lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task] = {}  # client id -> the task answering it
        # Every task of this connection until it has returned. A task leaves `tasks` just before its last
        # frame (so the id can be reused) but may then still wait to write; the in-flight limit and close()
        # count it until it is done, so a client that does not read cannot pile up tasks.
        self.active: set[asyncio.Task] = set()
        self.generating: set[str] = set()  # the client ids among tasks that are generate requests

    def engine_id(self, client_id: str) -> str:
        # Ids are the client's choice and unique only per connection; the engine needs them unique overall.
        return f"c{self.number}:{client_id}"

    async def send(self, frame: dict) -> None:
        async with self.write_lock:
            self.writer.write(protocol.encode(frame))
            try:
                await asyncio.wait_for(self.writer.drain(), self.server.options.write_timeout)
            except asyncio.TimeoutError:
                log.warning("connection %d did not read for %g s; disconnecting it", self.number,
                            self.server.options.write_timeout)
                # abort() drops the unsent buffer and closes at once; serve() then stops reading and close() runs.
                self.writer.transport.abort()
                raise ConnectionResetError("the client stopped reading") from None

    async def serve(self) -> None:
        try:
            while True:
                try:
                    message = await protocol.read_frame(self.reader, self.server.options.max_frame,
                                                        self.server.options.read_timeout)
                except protocol.ProtocolError as exc:
                    await self.send_error(None, exc.code, exc.message)
                    if exc.fatal:
                        return
                    continue
                # Once our side is closing (the client stopped reading, or the server shuts down), frames
                # still buffered from the client are not worth answering: nobody would read the answers.
                if message is None or self.writer.transport.is_closing():
                    return
                self.server.frames_received += 1
                await self.dispatch(message)
        except ConnectionError:
            pass  # the client went away; the finally below cleans up
        finally:
            await self.close()

    async def dispatch(self, message: dict) -> None:
        try:
            request = protocol.parse_request(message)
        except protocol.ProtocolError as exc:
            return await self.send_error(exc.request_id, exc.code, exc.message)
        if request.id in self.tasks:
            return await self.send_error(request.id, "duplicate_request_id",
                                         f"id {request.id!r} is already in flight on this connection")
        if isinstance(request, protocol.Abort):
            # Answered here, before the next frame is read: a client at its in-flight limit can still abort,
            # and a flood of aborts is throttled by how fast the client reads the answers.
            return await self.abort(request)
        limit = self.server.options.max_inflight_per_connection
        if len(self.active) >= limit:
            return await self.send_error(request.id, "too_many_requests",
                                         f"{len(self.active)} requests are in flight on this connection, "
                                         f"the limit is {limit}; wait for one to end")
        if isinstance(request, protocol.Generate):
            if self.server.closing:
                return await self.send_error(request.id, "shutting_down", "the server is shutting down")
            handler = self.generate(request)
            self.generating.add(request.id)
        else:
            handler = self.query(request)
        task = asyncio.create_task(self.guard(request.id, handler))
        self.tasks[request.id] = task
        self.active.add(task)
        task.add_done_callback(self.active.discard)

    async def guard(self, request_id: str, handler) -> None:
        """Run one request's handler; whatever it raises becomes an error frame for that request alone."""
        try:
            await handler
        except KvmuxError as exc:
            await self.send_error(request_id, exc.code, exc.message)
        except ConnectionError:
            pass  # the connection is going away: nobody to tell
        except Exception as exc:
            log.exception("request %r failed", request_id)
            await self.send_error(request_id, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.release(request_id)

    def release(self, request_id: str) -> None:
        """Free a request's id. Called from the request's own task only, before its last frame is sent: a
        client may reuse the id as soon as it reads that frame, and the new request must not be refused."""
        if self.tasks.get(request_id) is asyncio.current_task():
            del self.tasks[request_id]
            self.generating.discard(request_id)

    async def send_last(self, request_id: str, frame: dict) -> None:
        self.release(request_id)
        await self.send(frame)

    async def send_error(self, request_id: str | None, code: str, message: str) -> None:
        self.server.errors_sent += 1
        if request_id is not None:
            self.release(request_id)
        with contextlib.suppress(ConnectionError):
            await self.send(protocol.error_frame(request_id, code, message))

    async def generate(self, request: protocol.Generate) -> None:
        engine = self.server.engine
        stream = engine.generate(request.prompt, SamplingParams(**request.params),
                                 request_id=self.engine_id(request.id), priority=request.priority)
        samples_left = num_samples(request.params.get("n", 1))
        # aclosing: leaving early (a lost connection, cancellation) closes the stream, which aborts the request.
        async with contextlib.aclosing(stream):
            async for out in stream:
                samples_left -= out.finished
                frame = protocol.output_frame(request.id, out)
                await (self.send_last(request.id, frame) if samples_left == 0 else self.send(frame))

    async def abort(self, request: protocol.Abort) -> None:
        found = request.target in self.generating
        if found:
            await self.server.engine.abort(self.engine_id(request.target))
        await self.send(protocol.result_frame(request.id, "abort", {"target": request.target, "aborted": found}))

    async def query(self, request: protocol.Query) -> None:
        data = await getattr(self.server, f"{request.op}_data")()
        await self.send_last(request.id, protocol.result_frame(request.id, request.op, data))

    async def close(self) -> None:
        """Cancel every request of this connection (aborting them in the engine) and close it."""
        tasks = list(self.active)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class Server:
    """Serves an Engine on a Unix socket.

        async with Engine(...) as engine:
            server = Server(engine, ServerOptions("/tmp/kvmux.sock"))
            await server.start()
            ...
            await server.shutdown()
    """

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.connections: set[Connection] = set()
        self.closing = False
        self.frames_received = 0
        self.errors_sent = 0
        self._numbers = itertools.count()
        self._connections_total = 0
        self._listener: asyncio.AbstractServer | None = None
        self._inode = 0

    async def start(self) -> None:
        sock = unix_socket.bind(self.options.socket_path, self.options.socket_mode)
        self._inode = os.lstat(self.options.socket_path).st_ino
        self._listener = await asyncio.start_unix_server(self._accept, sock=sock, limit=self.options.max_frame + 64)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, next(self._numbers), reader, writer)
        self.connections.add(conn)
        self._connections_total += 1
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    def in_flight(self) -> int:
        return sum(len(c.generating) for c in self.connections)

    async def shutdown(self) -> None:
        """Stop admitting, let in-flight requests finish within the grace period, abort the rest, close."""
        self.closing = True
        if self._listener is not None:
            self._listener.close()
        unix_socket.remove(self.options.socket_path, self._inode)
        deadline = time.monotonic() + self.options.grace_period
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Abort what is left through the engine, so clients see a final frame with finish_reason "abort".
        for conn in list(self.connections):
            for client_id in list(conn.generating):
                await self.engine.abort(conn.engine_id(client_id))
        deadline = time.monotonic() + 5
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(c.close() for c in list(self.connections)), return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()

    # -- query results ---------------------------------------------------------

    async def stats_data(self) -> dict:
        stats = await self.engine.stats()
        stats.update(connections=len(self.connections), connections_total=self._connections_total,
                     requests_in_flight=self.in_flight(), frames_received=self.frames_received,
                     errors_sent=self.errors_sent)
        return stats

    async def health_data(self) -> dict:
        return {"status": "shutting_down" if self.closing else "ok", "requests_in_flight": self.in_flight(),
                "connections": len(self.connections)}

    async def model_data(self) -> dict:
        d = self.engine.describe()
        return {"model": d["model"], "path": str(d["path"]), "dtype": d["dtype"], "max_model_len": d["max_model_len"],
                "block_size": d["block_size"], "num_blocks": d["num_blocks"],
                "block_bytes": self.engine.geometry.block_bytes, "vocab_size": self.engine.loaded.config.vocab_size,
                "config": d["config"]}
