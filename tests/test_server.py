"""The Unix-socket server and its clients: protocol round trips, multiplexing, every error code,
disconnects, the socket file's life cycle, graceful shutdown, the CLI client and the examples runner."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from kvmux.engine import messages
from kvmux.sampling import SamplingParams
from kvmux.serve import protocol
from kvmux.serve.client import AsyncClient, Client, ConnectionFailed, ConnectionLost, ServerError
from kvmux.serve.unix_socket import SocketInUse

from engine_helpers import PROMPT, ForwardGate, greedy, until, wire
from server_helpers import SMALL, Raw, Served, short_dir, start_pair, step_until

ROOT = Path(__file__).resolve().parent.parent
LONG = wire(greedy(200))  # stays in flight for a good while
SHORT = wire(greedy(8))


@pytest.fixture(scope="module")
def served(tiny):
    s = Served(tiny)
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(tiny):
    """A SMALL engine, where a request is easily preempted back to prefill."""
    s = Served(tiny, {**SMALL, "preemption_mode": "recompute"})
    yield s
    s.close()


# -- protocol ---------------------------------------------------------------------

def test_param_types_match_sampling_params():
    assert set(protocol.PARAM_TYPES) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_frames_round_trip_and_decoding_is_strict():
    message = {"op": "generate", "id": "x", "prompt": "héllo", "params": {"stop": ["\n"]}}
    encoded = protocol.pack_frame(message)
    assert protocol.HEADER.unpack(encoded[:4])[0] == len(encoded) - 4
    assert protocol.unpack_frame(encoded[4:]) == message
    for bad in (msgpack.packb(msgpack.ExtType(1, b"x")), msgpack.packb({1: "int key"}), msgpack.packb([1]), b"\xc1"):
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.unpack_frame(bad)
        assert info.value.code == "malformed_frame"


# -- the server over the client library ----------------------------------------------

def test_generate_stream_complete_and_queries(served):
    async def main():
        async with AsyncClient(served.path) as client:
            outs = [o async for o in client.generate(PROMPT, SHORT)]
            whole = await client.complete(PROMPT, SamplingParams(**SHORT))
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            assert [t for o in outs for t in o.token_ids] == whole.token_ids and len(whole.token_ids) == 8
            assert "".join(o.text for o in outs) == whole.text
            assert (whole.num_prompt_tokens, whole.num_output_tokens) == (len(PROMPT), 8)
            chat = await client.complete([{"role": "user", "content": "hello world"}], {"max_tokens": 3})
            assert chat.num_output_tokens <= 3 and chat.finish_reason in ("stop", "length")
            assert (await client.health())["status"] == "ok"
            model = await client.model()
            assert (model["model"], model["max_model_len"], model["block_size"], model["num_blocks"]) == (
                "m", 256, 8, 64)
            assert model["config"]["block_size"] == 8 and model["config"]["preemption_mode"] == "auto"
            stats = await client.stats()
            assert stats["blocks_total"] == 64 and stats["connections"] >= 1
            # The protocol promises numbers only (settings live in model's config).
            assert [k for k, v in stats.items() if type(v) not in (int, float)] == []
            return whole.token_ids

    tokens = asyncio.run(main())
    with Client(served.path) as client:  # the blocking client gets the same greedy tokens
        assert [t for o in client.generate(PROMPT, SHORT) for t in o.token_ids] == tokens
        assert client.abort("nothing-in-flight") is False
    served.settle()


def test_many_requests_multiplex_on_one_connection(served):
    prompts = [PROMPT, PROMPT[:3], [42, 43, 44, 45], [200] * 9]

    async def main():
        async with AsyncClient(served.path) as client:
            alone = [(await client.complete(p, SHORT)).token_ids for p in prompts]
            together = await asyncio.gather(*(client.complete(p, SHORT) for p in prompts))
            assert [c.token_ids for c in together] == alone

    asyncio.run(main())
    # On the wire, frames of different requests interleave: several streams are open at once.
    raw = Raw(served.path)
    with ForwardGate(served.engine):  # all four are admitted before the first step runs
        for i, p in enumerate(prompts):
            raw.send({"op": "generate", "id": f"m{i}", "prompt": p, "params": SHORT})
        served.wait_for(lambda s: s["requests_live"] == len(prompts))
    seen_before_first_end, done = set(), set()
    while len(done) < len(prompts):
        frame = raw.recv()
        assert frame["type"] == "output", frame
        if not done:
            seen_before_first_end.add(frame["id"])
        if frame["finished"]:
            done.add(frame["id"])
    assert len(seen_before_first_end) > 1
    # An id is free again as soon as its last frame has been read.
    for _ in range(3):
        raw.send({"op": "generate", "id": "m0", "prompt": PROMPT, "params": SHORT})
        assert raw.until_finished("m0")["finish_reason"] == "length"
    raw.close()
    served.settle()


def test_parallel_samples_stream_with_their_index(served):
    async def main():
        async with AsyncClient(served.path) as client:
            params = {**SHORT, "temperature": 1.0, "seed": 3, "n": 3}
            outs = [o async for o in client.generate(PROMPT, params)]
            assert sorted(o.index for o in outs if o.finished) == [0, 1, 2]
            whole = await client.complete(PROMPT, params)
            assert [len(c.token_ids) for c in whole.samples] == [8, 8, 8]
            single = await client.complete(PROMPT, {**params, "n": 1})
            assert whole.samples[0].token_ids == single.token_ids  # sample 0 is the n=1 request
            async with contextlib.aclosing(client.generate(PROMPT, {**LONG, "n": 2}, request_id="pair")) as stream:
                async for _ in stream:
                    break  # leaving early aborts every sample
            await client.complete(PROMPT, SHORT, request_id="pair")  # and once closed, the id is free again

    asyncio.run(main())
    served.settle()


def test_the_same_id_on_two_connections_is_two_requests(served):
    async def main():
        async with AsyncClient(served.path) as a, AsyncClient(served.path) as b:
            ra, rb = await asyncio.gather(a.complete(PROMPT, SHORT, request_id="same"),
                                          b.complete(PROMPT, SHORT, request_id="same"))
            assert ra.token_ids == rb.token_ids and ra.finish_reason == "length"

    asyncio.run(main())
    served.settle()


def abort_deferred(served) -> bool:
    """Decode, holding a forward, has kept an abort for the step's end: released, the request ends there."""
    return any(isinstance(m, messages.Abort) for m in served.engine.decode.deferred)


def test_abort_and_early_exit(served):
    async def collect(stream) -> list:
        return [out async for out in stream]

    async def main():
        async with AsyncClient(served.path) as client:
            with ForwardGate(served.engine) as gate:
                gate.allow(2)  # two tokens, then "long" is held mid-stream
                long = asyncio.create_task(collect(client.generate(PROMPT, LONG, request_id="long")))
                await gate.held()
                assert await client.abort("long") is True
                await asyncio.to_thread(served.call, until(lambda: abort_deferred(served)))
                gate.release()
                outs = await long
            assert outs[-1].finish_reason == "abort" and 2 <= outs[-1].num_output_tokens < 200
            async for out in client.generate(PROMPT, LONG, request_id="long"):  # the id is free again
                break  # leaving early aborts it
            await client.complete(PROMPT, SHORT)  # the connection goes on

    asyncio.run(main())
    served.settle()


# -- errors ----------------------------------------------------------------------------

def error_of(raw: Raw, message: dict | bytes) -> dict:
    if isinstance(message, bytes):
        raw.send_bytes(message)
    else:
        raw.send(message)
    frame = raw.recv()
    assert frame["type"] == "error", frame
    return frame


def test_every_error_code(served):
    seen = set()
    raw = Raw(served.path)

    def expect(code: str, message, request_id="e"):
        frame = error_of(raw, message)
        assert (frame["code"], frame["id"]) == (code, request_id), frame
        assert frame["message"]
        seen.add(code)
        return frame

    gen = {"op": "generate", "id": "e", "prompt": PROMPT, "params": SHORT}
    expect("malformed_frame", b"\xc1", None)
    expect("malformed_frame", msgpack.packb(["not", "a", "map"]), None)
    expect("malformed_frame", msgpack.packb({"op": msgpack.ExtType(3, b"")}), None)
    expect("unknown_op", {"op": "fly", "id": "e"})
    expect("missing_field", {"op": "generate", "id": "e"})
    assert "'op'" in expect("missing_field", {"id": "e"}, None)["message"]
    expect("missing_field", {"op": "abort", "id": "e"})
    assert "'prompt'" in expect("invalid_field", {**gen, "prompt": 7})["message"]
    assert "'prompt'" in expect("invalid_field", {**gen, "prompt": [{"role": "user"}]})["message"]
    assert "'bogus'" in expect("invalid_field", {**gen, "bogus": 1})["message"]
    assert "'beam'" in expect("invalid_field", {**gen, "params": {"beam": 4}})["message"]
    assert "'max_tokens'" in expect("invalid_field", {**gen, "params": {"max_tokens": "10"}})["message"]
    assert "'n'" in expect("invalid_field", {**gen, "params": {"n": "2"}})["message"]
    expect("invalid_field", {**gen, "priority": True})
    expect("invalid_field", {"op": "stats", "id": ""}, None)
    assert "temperature" in expect("invalid_params", {**gen, "params": {"temperature": -1.0}})["message"]
    assert "n must" in expect("invalid_params", {**gen, "params": {"n": 0}})["message"]
    expect("invalid_prompt", {**gen, "prompt": [1, 99999]})
    expect("invalid_prompt", {**gen, "prompt": ""})
    expect("prompt_too_long", {**gen, "params": {"max_tokens": 1000}})

    # Requests that must still be in flight when the next frame arrives are held at the forward gate.
    with ForwardGate(served.engine) as gate:
        raw.send({**gen, "id": "busy", "params": LONG})
        expect("duplicate_request_id", {**gen, "id": "busy"}, "busy")
        raw.send({"op": "abort", "id": "stop-busy", "target": "busy"})
        gate.release()
        assert raw.until_finished("busy")["finish_reason"] == "abort"

        # max_pending is 4: of six long requests sent at once, the last two are refused.
        gate.hold()
        ids = [f"o{i}" for i in range(6)]
        for request_id in ids:
            raw.send({**gen, "id": request_id, "params": {**LONG, "max_tokens": 60}})
        refused = [raw.recv() for _ in ids[4:]]  # held, the four admitted ones send nothing yet
        assert [(f["id"], f["code"]) for f in refused] == [("o4", "overloaded"), ("o5", "overloaded")]
        gate.release()
        last = raw.until_finished(*ids[:4])
        assert all(last[i]["finish_reason"] == "length" for i in ids[:4])
        seen.add("overloaded")

        raw.send({"op": "health", "id": "h"})
        assert raw.recv()["data"]["status"] == "ok"  # after all that, the connection still works
        raw.close()

        # Framing errors close the connection (after saying why), and only that connection.
        raw = Raw(served.path)
        raw.sock.sendall(protocol.HEADER.pack(served.server.options.max_frame + 1))
        assert raw.recv()["code"] == "frame_too_large" and raw.recv() is None
        seen.add("frame_too_large")
        raw = Raw(served.path)
        raw.sock.sendall(b"\x00\x00")  # half a header, then silence past the read timeout
        assert raw.recv()["code"] == "frame_timeout" and raw.recv() is None
        seen.add("frame_timeout")

        # A server allowing one request in flight per connection refuses a second one (tests/test_limits.py has more).
        narrow = served.start_server(os.path.join(short_dir(), "n.sock"), max_inflight_per_connection=1)
        raw = Raw(narrow.options.socket_path)
        gate.hold()
        raw.send({**gen, "id": "one", "params": LONG})
        expect("too_many_requests", {**gen, "id": "two"}, "two")
        raw.send({"op": "abort", "id": "stop-one", "target": "one"})
        gate.release()
        assert raw.until_finished("one")["finish_reason"] == "abort"
        raw.close()
        served.call(narrow.shutdown())

        # A server allowing one connection answers a second one with why it is refused, and closes it.
        single = served.start_server(os.path.join(short_dir(), "c.sock"), max_connections=1)
        first = Raw(single.options.socket_path)
        first.send({"op": "health", "id": "h"})
        assert first.recv()["type"] == "result"  # the first connection is open and counted
        second = Raw(single.options.socket_path)
        frame = second.recv()
        assert (frame["type"], frame["code"], frame["id"]) == ("error", "too_many_connections", None), frame
        assert second.recv() is None
        seen.add("too_many_connections")
        first.send({"op": "health", "id": "h"})
        assert first.recv()["type"] == "result"
        first.close(), second.close()
        served.call(single.shutdown())

        # A second server on the same engine, shutting down while a request runs: new work is refused.
        other = served.start_server(os.path.join(short_dir(), "o.sock"), grace_period=30)
        raw = Raw(other.options.socket_path)
        gate.hold()  # "running" cannot finish before "late" has been refused
        raw.send({**gen, "id": "running", "params": {**LONG, "max_tokens": 40}})
        gate.allow(1)
        assert raw.recv()["type"] == "output"
        gate.wait_held()
        stopping = served.loop.submit(other.shutdown())
        served.call(until(lambda: other.closing))
        raw.send({**gen, "id": "late"})
        assert raw.until_finished("late")["code"] == "shutting_down"
        seen.add("shutting_down")
        gate.release()
        assert raw.until_finished("running")["finish_reason"] == "length"  # the grace period let it finish
        stopping.result(timeout=30)
        assert not os.path.exists(other.options.socket_path)

    # The rest are tested where they can happen: tests/test_faults.py (internal_error, engine_dead) and
    # test_a_stopped_engine_is_not_running below.
    assert seen == set(protocol.ERROR_CODES) - {"internal_error", "engine_dead", "not_running"}
    served.settle()


def test_bin_and_mixed_keys_are_malformed_and_the_connection_goes_on(served):
    """Keys are str. A frame mixing str and bin keys used to end the connection silently (sorting its unknown
    keys raised outside any handler), cutting off the connection's other requests mid-stream."""
    raw = Raw(served.path)
    with ForwardGate(served.engine) as gate:  # "g" is in flight, and sends nothing until the gate opens
        raw.send({"op": "generate", "id": "g", "prompt": PROMPT, "params": SHORT})
        gate.wait_held()
        for message in ({"op": "health", "id": "k4", b"x": 1, "y": 2}, {b"op": "health", b"id": "k5"},
                        {"op": "generate", "id": "k6", "prompt": PROMPT, "params": {b"max_tokens": 3}}):
            frame = error_of(raw, msgpack.packb(message, use_bin_type=True))
            assert (frame["code"], frame["id"]) == ("malformed_frame", None), frame
            assert "keys must be msgpack str" in frame["message"]
        gate.release()
    last = raw.until_finished("g")
    assert last["finish_reason"] == "length" and last["num_output_tokens"] == 8
    raw.send({"op": "health", "id": "h"})
    assert raw.recv()["data"]["status"] == "ok"
    raw.close()
    served.settle()


def test_an_unexpected_failure_is_that_frames_internal_error(served, monkeypatch):
    """No exception while handling one frame may end its connection: it is internal_error for that frame."""
    real = protocol.parse_op

    def fragile(message):
        if message.get("id") == "boom":
            raise RuntimeError("injected parse fault")
        return real(message)
    monkeypatch.setattr(protocol, "parse_op", fragile)
    raw = Raw(served.path)
    with ForwardGate(served.engine) as gate:
        raw.send({"op": "generate", "id": "g", "prompt": PROMPT, "params": SHORT})
        gate.wait_held()
        frame = error_of(raw, {"op": "health", "id": "boom"})
        assert (frame["code"], frame["id"]) == ("internal_error", "boom") and "injected parse fault" in frame["message"]
        gate.release()
    assert raw.until_finished("g")["finish_reason"] == "length"  # the request in flight went on
    raw.send({"op": "health", "id": "h"})
    assert raw.recv()["data"]["status"] == "ok"
    raw.close()
    served.settle()


def test_the_read_timeout_is_one_deadline_per_frame(served):
    """A frame must be complete within the read timeout of its first byte. The header and the body each used to
    get the whole timeout, so a frame whose header completed just before it was cut off only at about twice it."""
    timeout = 2.0
    server = served.start_server(os.path.join(short_dir(), "t.sock"), read_timeout=timeout)
    raw = Raw(server.options.socket_path)
    header = protocol.HEADER.pack(100)
    raw.sock.sendall(header[:1])
    started = time.monotonic()
    time.sleep(0.9 * timeout)  # paces the sender: the header completes just inside the timeout
    # A sender that wakes late finds the connection already cut: what the server answered is checked below.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.sock.sendall(header[1:])
        # Then the body trickles, one byte per 0.1 s, until the server answers.
        while not select.select([raw.sock], [], [], 0.1)[0]:
            raw.sock.sendall(b"\xc0")
    frame = raw.recv()
    cut_after = time.monotonic() - started
    assert frame["code"] == "frame_timeout" and raw.recv() is None
    assert cut_after < timeout + 1.0, f"cut off {cut_after:.2f} s after the frame's first byte, the timeout is {timeout} s"
    raw.close()
    served.call(server.shutdown())


def test_an_id_reused_after_its_abort_runs_to_completion(served):
    """Abort "a" while decode holds it (after its first token), then reuse the id: the abort's tombstone in
    prefill, which did not hold it, must not end the new request."""
    raw = Raw(served.path)
    with ForwardGate(served.engine) as gate:
        raw.send({"op": "generate", "id": "a", "prompt": PROMPT, "params": LONG})
        gate.allow(1)
        assert raw.recv()["type"] == "output"  # its first token: decode holds it now
        gate.wait_held()
        raw.send({"op": "abort", "id": "x", "target": "a"})
        served.call(until(lambda: abort_deferred(served)))
        gate.release()
        assert raw.until_finished("a")["finish_reason"] == "abort"
    raw.send({"op": "generate", "id": "a", "prompt": PROMPT, "params": SHORT})
    last = raw.until_finished("a")
    assert (last["finish_reason"], last["num_output_tokens"]) == ("length", 8)
    raw.close()
    served.settle()


def test_an_id_reused_after_its_abort_in_prefill_runs_to_completion(small):
    """The same while prefill holds it: "b" has its first tokens and has been preempted back to prefill when it
    is aborted; decode, which did not hold it, must not end the new "b"."""
    with ForwardGate(small.engine) as gate:
        first, second = start_pair(small, gate)
        step_until(small, gate, lambda s: s["preempted_waiting"] == 1)
        second.send({"op": "abort", "id": "x", "target": "b"})
        aborted = second.until_finished("b")
        assert aborted["finish_reason"] == "abort" and aborted["num_output_tokens"] > 0
        second.send({"op": "generate", "id": "b", "prompt": PROMPT[::-1], "params": wire(greedy(10))})
        gate.release()
        last = second.until_finished("b")
    assert (last["finish_reason"], last["num_output_tokens"]) == ("length", 10)
    assert first.until_finished("a")["finish_reason"] == "length"
    first.close(), second.close()
    small.settle()


def test_disconnect_mid_stream_frees_blocks(served):
    raw = Raw(served.path)
    with ForwardGate(served.engine) as gate:
        for i in range(3):
            raw.send({"op": "generate", "id": f"d{i}", "prompt": PROMPT * (i + 1), "params": LONG})
        step_until(served, gate, lambda s: s["running"] == 3)  # all three are decoding, held mid-stream
        assert served.engine.blocks.num_free < served.engine.blocks.num_blocks
        raw.close()
        gate.release()
    served.settle()


def test_client_errors():
    with pytest.raises(ConnectionFailed):
        Client(os.path.join(short_dir(), "nobody.sock"))
    # A "server" that hangs up at once: requests in flight fail with ConnectionLost.
    path = os.path.join(short_dir(), "hangup.sock")

    async def main():
        async def hang_up(reader, writer):
            await reader.read(1)
            writer.close()
        listener = await asyncio.start_unix_server(hang_up, path)
        async with AsyncClient(path) as client:
            with pytest.raises(ConnectionLost):
                await client.complete(PROMPT, SHORT)
        listener.close()

    asyncio.run(main())

    # A "server" answering with a frame the client cannot route: the request hears why instead of waiting forever.
    path = os.path.join(short_dir(), "odd.sock")

    async def odd():
        async def answer_oddly(reader, writer):
            await protocol.read_frame(reader)
            writer.write(protocol.pack_frame({"type": "output", "id": ["not", "a", "str"]}))
            await reader.read()  # and stay connected
        listener = await asyncio.start_unix_server(answer_oddly, path)
        async with AsyncClient(path) as client:
            with pytest.raises(ConnectionLost, match="could not be handled"):
                await asyncio.wait_for(client.complete(PROMPT, SHORT), 30)
        listener.close()

    asyncio.run(odd())


def test_server_error_is_raised_by_the_client(served):
    with Client(served.path) as client:
        with pytest.raises(ServerError) as info:
            client.complete(PROMPT, {"max_tokens": 0})
        assert info.value.code == "invalid_params"
        with pytest.raises(ServerError) as info:
            client.complete(PROMPT, {"top_q": 1})
        assert info.value.code == "invalid_field"


def test_a_stopped_engine_is_not_running(tiny):
    served = Served(tiny)
    try:
        served.call(served.engine.stop())
        with Client(served.path) as client:
            with pytest.raises(ServerError) as info:
                client.complete(PROMPT, SHORT)
        assert info.value.code == "not_running"
    finally:
        served.close()


# -- the socket file ---------------------------------------------------------------

def test_socket_mode_stale_and_live(served):
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600
    with pytest.raises(SocketInUse, match="already listening"):
        served.start_server(served.path)

    stale = os.path.join(short_dir(), "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(stale)
    dead.close()  # bound, never listened, not unlinked: what a killed server leaves behind
    server = served.start_server(stale, socket_mode=0o660)
    assert stat.S_IMODE(os.stat(stale).st_mode) == 0o660
    with Client(stale) as client:
        assert client.health()["status"] == "ok"
    served.call(server.shutdown())
    assert not os.path.exists(stale)

    not_a_socket = os.path.join(short_dir(), "file")
    Path(not_a_socket).write_text("keep me")
    with pytest.raises(SocketInUse, match="not a socket"):
        served.start_server(not_a_socket)
    assert Path(not_a_socket).read_text() == "keep me"


# -- processes: kvmux serve, the CLI client, the examples runner ----------------------

def wait_for_socket(path: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                pass
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)


def test_serve_cli_client_and_sigterm(tiny):
    path = os.path.join(short_dir(), "k.sock")
    server = subprocess.Popen([sys.executable, "-m", "kvmux", "serve", "--socket", path, "--model", tiny,
                               "--num-blocks", "64", "--block-size", "8", "--grace-period", "20"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_socket(path, server)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        cli = [sys.executable, "-m", "kvmux"]
        done = subprocess.run(cli + ["client", "--socket", path, "--raw", "--max-tokens", "5", "--ignore-eos",
                                     "hello world"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "5 output tokens" in done.stderr and "finish: length" in done.stderr
        done = subprocess.run(cli + ["stats", "--socket", path], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "blocks_total" in done.stdout and "requests_admitted" in done.stdout

        # SIGTERM while a request streams: it is allowed to finish, then the server removes its socket and exits 0.
        with Client(path) as client:
            stream = client.generate(PROMPT, {**LONG, "max_tokens": 150})
            first = next(stream)
            server.send_signal(signal.SIGTERM)
            last = [first, *stream][-1]
        assert last.finish_reason == "length" and last.num_output_tokens == 150
        assert server.wait(timeout=30) == 0, server.communicate()
        assert not os.path.exists(path)
    finally:
        if server.poll() is None:
            server.kill()


def test_sigterm_ends_within_its_bound_while_a_client_reads_nothing(tiny):
    """A client floods stats and a generate and never reads. Shutdown used to wait for its unsent answers to
    drain, for as long as it stayed connected; it must end within grace period + drain timeout."""
    grace, drain = 1.0, 2.0
    path = os.path.join(short_dir(), "k.sock")
    server = subprocess.Popen([sys.executable, "-m", "kvmux", "serve", "--socket", path, "--model", tiny,
                               "--num-blocks", "64", "--block-size", "8", "--grace-period", str(grace),
                               "--drain-timeout", str(drain)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stuck = socket.socket(socket.AF_UNIX)
    try:
        wait_for_socket(path, server)
        stuck.connect(path)
        frames = [{"op": "generate", "id": "g", "prompt": PROMPT, "params": LONG}]
        frames += [{"op": "stats", "id": f"s{i}"} for i in range(400)]
        stuck.sendall(b"".join(map(protocol.pack_frame, frames)))
        with Client(path) as control:  # wait until the server holds answers that it cannot send
            deadline = time.monotonic() + 60
            while control.stats()["unsent_bytes"] == 0:
                assert time.monotonic() < deadline, "the server never had answers it could not send"
        server.send_signal(signal.SIGTERM)
        # Slack: stopping the engine, and the interpreter tearing torch down (10 s seen with the load average at 7).
        bound, slack = grace + drain, 30
        try:
            assert server.wait(timeout=bound + slack) == 0, server.communicate()
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server was still running {bound + slack} s after SIGTERM (bound: grace + drain = {bound} s)")
    finally:
        stuck.close()
        if server.poll() is None:
            server.kill()


def test_examples_runner_passes_on_a_tiny_model(tiny_long, tmp_path):
    """`kvmux examples` from any folder, with the runner's own options (on the tiny model with room for tools)."""
    kvmux = [sys.executable, "-m", "kvmux", "examples"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    listed = subprocess.run(kvmux + ["--list"], cwd=tmp_path, env=env, capture_output=True, text=True)
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"quickstart", "chat_stream", "shared_prefix", "parallel_sampling", "abort", "stats",
            "openai_client", "tool_calls"} <= names
    done = subprocess.run(kvmux + ["-v", "-j", "2", "--timeout", "200", "--model", tiny_long], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(names)} passed, 0 failed" in done.stdout
    assert "requests in flight" in done.stdout  # -v shows the examples' own output
    assert "called get_weather(" in done.stdout  # tool_calls' required call
