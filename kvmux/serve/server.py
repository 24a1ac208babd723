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
from collections.abc import Awaitable
from dataclasses import dataclass

from kvmux.engine.supervisor import Engine
from kvmux.outputs import KvmuxError
from kvmux.sampling import SamplingParams, num_samples
from kvmux.serve import protocol, unix_socket

log = logging.getLogger("kvmux.serve.server")
READ_BUFFER = 64 << 10


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
    # Seconds after the grace period for the last frames (aborted requests' final outputs) to reach clients on
    # shutdown; a connection whose client has not read them by then is cut. Shutdown ends within
    # grace_period + drain_timeout, whatever clients do.
    drain_timeout: float = 5.0
    # Connections open at once; more are answered with too_many_connections and closed. With the per-connection
    # bounds this bounds the memory all clients together can pin (docs/protocol.md, Limits).
    max_connections: int = 256


class Connection:
    def __init__(self, server: "Server", number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.number = number
        self.reader = reader
        self.writer = writer
        self.write_lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task] = {}  # request_id -> the task answering it
        # Every task of this connection until it has returned. A task leaves `tasks` just before its last
        # frame (so the id can be reused) but may then still wait to write; the in-flight limit and close()
        # count it until it is done, so a client that does not read cannot pile up tasks.
        self.active: set[asyncio.Task] = set()
        self.generating: set[str] = set()  # the request_ids among tasks that are generate requests

    def engine_request_id(self, request_id: str) -> str:
        # A client chooses its request_ids, unique only on its connection; the engine needs them unique overall.
        return f"c{self.number}:{request_id}"

    def unsent_bytes(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def send(self, frame: dict) -> None:
        async with self.write_lock:
            if self.writer.transport.is_closing():  # cut, or closed by the client: the frame has nowhere to go
                raise ConnectionResetError("the connection is closing")
            self.writer.write(protocol.pack_frame(frame))
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
                answer = self.answer(message)
                # Acting on a frame is synchronous; only its answer may wait (on a client that does not read). The
                # decoded frame, up to ~80x its size, is dropped first, so neither that wait nor a connection
                # idle between frames holds it.
                del message
                if answer is not None:
                    await answer
        except ConnectionError:
            pass  # the client went away; the finally below cleans up
        except Exception as exc:  # a bug in reading frames: the byte stream can no longer be split, so say why and go
            log.exception("reading from connection %d failed", self.number)
            await self.send_error(None, "internal_error", f"reading a frame failed: {type(exc).__name__}: {exc}")
        finally:
            await self.close(self.server.options.write_timeout)

    def answer(self, message: dict) -> Awaitable[None] | None:
        """Act on one frame and return what the reader must send before it reads on, if anything. Whatever goes
        wrong is that frame's internal_error; the connection goes on."""
        try:
            return self.dispatch(message)
        except Exception as exc:
            log.exception("a frame on connection %d failed", self.number)
            request_id = message.get("id")
            return self.send_error(request_id if isinstance(request_id, str) else None, "internal_error",
                                   f"handling the frame failed: {type(exc).__name__}: {exc}")

    def dispatch(self, message: dict) -> Awaitable[None] | None:
        try:
            op = protocol.parse_op(message)
        except protocol.ProtocolError as exc:
            return self.send_error(exc.request_id, exc.code, exc.message)
        if op.request_id in self.tasks:
            return self.send_error(op.request_id, "duplicate_request_id",
                                   f"id {op.request_id!r} is already in flight on this connection")
        if isinstance(op, protocol.AbortOp):
            # Answered before the next frame is read: a client at its in-flight limit can still abort, and a
            # flood of aborts is throttled by how fast the client reads the answers.
            return self.guard(op.request_id, self.abort(op))
        limit = self.server.options.max_inflight_per_connection
        if len(self.active) >= limit:
            return self.send_error(op.request_id, "too_many_requests",
                                   f"{len(self.active)} requests are in flight on this connection, "
                                   f"the limit is {limit}; wait for one to end")
        if isinstance(op, protocol.GenerateOp):
            if self.server.closing:
                return self.send_error(op.request_id, "shutting_down", "the server is shutting down")
            # The engine's stream takes the prompt and parameters; the handler keeps only the id, so the request
            # is held once, by the engine, for as long as it runs.
            stream = self.server.engine.generate(op.prompt, SamplingParams(**op.params),
                                                 request_id=self.engine_request_id(op.request_id), priority=op.priority,
                                                 cache_salt=op.cache_salt)
            handler = self.generate(op.request_id, stream, num_samples(op.params.get("n", 1)))
            self.generating.add(op.request_id)
        else:
            handler = self.query(op)
        task = asyncio.create_task(self.guard(op.request_id, handler))
        self.tasks[op.request_id] = task
        self.active.add(task)
        task.add_done_callback(self.active.discard)
        return None

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

    async def generate(self, request_id: str, stream, samples_left: int) -> None:
        # aclosing: leaving early (a lost connection, cancellation) closes the stream, which aborts the request.
        async with contextlib.aclosing(stream):
            async for out in stream:
                samples_left -= out.finished
                frame = protocol.output_frame(request_id, out)
                await (self.send_last(request_id, frame) if samples_left == 0 else self.send(frame))

    async def abort(self, op: protocol.AbortOp) -> None:
        found = op.target_request_id in self.generating
        if found:
            await self.server.engine.abort(self.engine_request_id(op.target_request_id))
        await self.send(protocol.result_frame(op.request_id, "abort",
                                              {"target": op.target_request_id, "aborted": found}))

    async def query(self, op: protocol.QueryOp) -> None:
        data = await getattr(self.server, f"{op.name}_data")()
        await self.send_last(op.request_id, protocol.result_frame(op.request_id, op.name, data))

    async def close(self, within: float) -> None:
        """Cancel every request of this connection (aborting them in the engine) and close it. What is left
        unsent may take `within` seconds to reach the client; past that the connection is cut, so closing
        never waits on a client that does not read."""
        tasks = list(self.active)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.close()  # flushes what is buffered, then closes
        closed = asyncio.ensure_future(self.writer.wait_closed())
        await asyncio.wait([closed], timeout=within)
        if not closed.done():
            log.warning("connection %d did not read its last %d bytes within %g s; cutting it", self.number,
                        self.unsent_bytes(), within)
            self.writer.transport.abort()  # drops the unsent buffer
            await asyncio.wait([closed])
        with contextlib.suppress(ConnectionError):
            closed.result()


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
        # The reader stops taking a client's bytes once 2 x READ_BUFFER of them wait unread (plus the chunk being
        # received; the frame being read may be larger): a connection holds about one frame of input at most.
        self._listener = await asyncio.start_unix_server(self._accept, sock=sock, limit=READ_BUFFER)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, next(self._numbers), reader, writer)
        self._connections_total += 1
        if len(self.connections) >= self.options.max_connections:
            # Said once, then closed (bounded like any close): the client did nothing wrong but come late.
            await conn.send_error(None, "too_many_connections", f"the server has {len(self.connections)} "
                                  f"connections open, the limit is {self.options.max_connections}; retry later")
            return await conn.close(self.options.write_timeout)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    def in_flight(self) -> int:
        return sum(len(c.generating) for c in self.connections)

    async def shutdown(self) -> None:
        """Stop admitting, let in-flight requests finish within the grace period, abort the rest, close.

        Ends within grace_period + drain_timeout whatever clients do: the aborted requests' final frames get
        drain_timeout to reach their clients, and a connection that has not taken them by then is cut.
        """
        self.closing = True
        if self._listener is not None:
            self._listener.close()
        unix_socket.remove(self.options.socket_path, self._inode)
        await self._until_idle(time.monotonic() + self.options.grace_period)
        # Abort what is left through the engine, so clients see a final frame with finish_reason "abort".
        for conn in list(self.connections):
            for request_id in list(conn.generating):
                await self.engine.abort(conn.engine_request_id(request_id))
        cutoff = time.monotonic() + self.options.drain_timeout
        await self._until_idle(cutoff)
        await asyncio.gather(*(c.close(max(0.0, cutoff - time.monotonic())) for c in list(self.connections)),
                             return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()

    async def _until_idle(self, deadline: float) -> None:
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- query results ---------------------------------------------------------

    async def stats_data(self) -> dict:
        stats = await self.engine.stats()
        stats.update(connections=len(self.connections), connections_total=self._connections_total,
                     requests_in_flight=self.in_flight(), frames_received=self.frames_received,
                     errors_sent=self.errors_sent, unsent_bytes=sum(c.unsent_bytes() for c in self.connections))
        return stats

    async def health_data(self) -> dict:
        return {"status": "shutting_down" if self.closing else "ok", "requests_in_flight": self.in_flight(),
                "connections": len(self.connections)}

    async def model_data(self) -> dict:
        d = self.engine.describe()
        return {"model": d["model"], "path": str(d["path"]), "dtype": d["dtype"], "quantization": d["quantization"],
                "max_model_len": d["max_model_len"],
                "block_size": d["block_size"], "num_blocks": d["num_blocks"],
                "block_bytes": self.engine.geometry.block_bytes,
                "vocab_size": self.engine.loaded.config.vocab_size,
                "kernels": d["kernels"], "config": d["config"]}
