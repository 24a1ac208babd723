"""Client library for a kvmux server: AsyncClient (asyncio) and Client (blocking).

    async with AsyncClient() as client:
        async for out in client.generate("Hello", {"max_tokens": 32}):
            print(out.text, end="")

Many requests may be in flight on one client at once; a reader task routes
each frame to its request by id. Imports neither torch nor the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Iterator

from kvmux.loop_thread import LoopThread
from kvmux.outputs import Completion, KvmuxError, RequestOutput
from kvmux.sampling import num_samples
from kvmux.serve import protocol
from kvmux.serve.unix_socket import default_socket_path


class ServerError(KvmuxError):
    """The server answered with an error frame; `code` is one of kvmux.serve.protocol.ERROR_CODES."""


class ConnectionFailed(KvmuxError):
    """No server could be reached at the socket path."""


class ConnectionLost(KvmuxError):
    """The connection closed while requests were in flight."""


def _params_map(params) -> dict:
    if params is None:
        return {}
    if dataclasses.is_dataclass(params):
        return dataclasses.asdict(params)
    return dict(params)


class AsyncClient:
    def __init__(self, socket_path: str | None = None, *, connect_timeout: float = 10.0,
                 max_frame: int = 64 * protocol.DEFAULT_MAX_FRAME) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self._pending: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._lost: KvmuxError | None = None

    async def connect(self) -> "AsyncClient":
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=self.max_frame + 64), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectionFailed("connection_failed", f"no kvmux server at {self.socket_path} ({exc}); "
                                                        "start one with `kvmux serve`") from None
        self._reader_task = asyncio.create_task(self._read_loop(reader))
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except ConnectionError:
                pass
        if self._reader_task is not None:
            await self._reader_task

    async def __aenter__(self) -> "AsyncClient":
        return self if self._writer is not None else await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- plumbing ----------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        reason = "the server closed the connection"
        try:
            while (frame := await protocol.read_frame(reader, self.max_frame, timeout=None)) is not None:
                self._route(frame)
        except (KvmuxError, ConnectionError) as exc:
            reason = str(exc)
        except Exception as exc:  # a frame this client cannot route (a server bug): every waiting request hears why
            reason = f"a frame from the server could not be handled: {type(exc).__name__}: {exc}"
        self._lost = ConnectionLost("connection_lost", reason)
        for queue in self._pending.values():
            queue.put_nowait(self._lost)

    def _route(self, frame: dict) -> None:
        request_id = frame.get("id")
        if request_id is None:
            # A connection-level error (e.g. malformed_frame) belongs to no request; every waiting one hears it.
            for queue in self._pending.values():
                queue.put_nowait(frame)
            return
        queue = self._pending.get(request_id)
        if queue is not None:
            queue.put_nowait(frame)

    def _new_id(self, request_id: str | None) -> str:
        if self._writer is None:
            raise ConnectionFailed("connection_failed", "not connected; call connect() or use `async with`")
        if self._lost is not None:
            raise self._lost
        if request_id is None:
            request_id = f"r{next(self._ids)}"
            while request_id in self._pending:  # a caller chose this id for a request of theirs
                request_id = f"r{next(self._ids)}"
        elif request_id in self._pending:
            raise ValueError(f"request id {request_id!r} is already in flight on this client")
        return request_id

    async def _send(self, frame: dict) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[frame["id"]] = queue
        try:
            self._writer.write(protocol.pack_frame(frame))
            await self._writer.drain()
        except ConnectionError as exc:
            del self._pending[frame["id"]]
            raise ConnectionLost("connection_lost", f"sending to {self.socket_path} failed: {exc}") from None
        return queue

    @staticmethod
    def _check(frame) -> dict:
        if isinstance(frame, KvmuxError):
            raise frame
        if frame["type"] == "error":
            raise ServerError(frame["code"], frame["message"])
        return frame

    async def _call(self, op: str, **fields) -> dict:
        request_id = self._new_id(None)
        queue = await self._send({"op": op, "id": request_id, **fields})
        try:
            return self._check(await queue.get())["data"]
        finally:
            del self._pending[request_id]

    # -- operations ----------------------------------------------------------------

    async def generate(self, prompt: str | list, params=None, *, request_id: str | None = None,
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's output as deltas. params: a SamplingParams or a dict of its fields.

        With params n > 1 the samples' pieces interleave, told apart by `index`. Raises ServerError if the
        server refuses the request. Leaving the loop early aborts it: at once when the stream is closed
        (`async with contextlib.aclosing(client.generate(...))`), else when Python collects the generator.
        """
        request_id = self._new_id(request_id)
        params = _params_map(params)
        frame = {"op": "generate", "id": request_id, "prompt": prompt, "params": params, "priority": priority}
        if cache_salt is not None:
            frame["cache_salt"] = cache_salt
        queue = await self._send(frame)
        samples_left = num_samples(params.get("n", 1))  # with n > 1, one finished frame per sample
        try:
            while samples_left:
                out = protocol.output_of(self._check(await queue.get()))
                samples_left -= out.finished
                yield out
        except ServerError:
            samples_left = 0  # an error frame ends the request on the server too
            raise
        finally:
            if samples_left and self._lost is None:
                # Left early: abort, and read the request's last frames, so that once the loop is left the
                # request is over on the server too and its id can be used again.
                with contextlib.suppress(KvmuxError):
                    await self.abort(request_id)
                    while samples_left:
                        samples_left -= self._check(await queue.get())["finished"]
            del self._pending[request_id]

    async def complete(self, prompt: str | list, params=None, **kw) -> Completion:
        """Run a request to the end and return its whole output."""
        return await Completion.collect(self.generate(prompt, params, **kw))

    async def abort(self, request_id: str) -> bool:
        """Abort a generate request of this client; False if it was no longer in flight."""
        return (await self._call("abort", target=request_id))["aborted"]

    async def stats(self) -> dict:
        return await self._call("stats")

    async def health(self) -> dict:
        return await self._call("health")

    async def model(self) -> dict:
        return await self._call("model")


class Client:
    """A blocking client: an AsyncClient on an event loop in a background thread.

        with Client() as client:
            print(client.complete("Hello", {"max_tokens": 16}).text)
    """

    def __init__(self, socket_path: str | None = None, **options) -> None:
        self._loop = LoopThread("kvmux-client")
        self._client = AsyncClient(socket_path, **options)
        try:
            self._run(self._client.connect())
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro):
        return self._loop.run(coro)

    def generate(self, prompt: str | list, params=None, **kw) -> Iterator[RequestOutput]:
        stream = self._client.generate(prompt, params, **kw)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    def complete(self, prompt: str | list, params=None, **kw) -> Completion:
        return self._run(self._client.complete(prompt, params, **kw))

    def abort(self, request_id: str) -> bool:
        return self._run(self._client.abort(request_id))

    def stats(self) -> dict:
        return self._run(self._client.stats())

    def health(self) -> dict:
        return self._run(self._client.health())

    def model(self) -> dict:
        return self._run(self._client.model())

    def close(self) -> None:
        if self._loop.alive:
            self._run(self._client.close())
            self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
