"""The Unix-socket server and its clients: protocol round trips, multiplexing, every error code,
disconnects, the socket file's life cycle, graceful shutdown, the CLI client and the examples runner."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from kvmux.sampling import SamplingParams
from kvmux.serve import protocol
from kvmux.serve.client import AsyncClient, Client, ConnectionFailed, ConnectionLost, ServerError
from kvmux.serve.unix_socket import SocketInUse

from engine_helpers import PROMPT, ForwardGate, greedy, wire
from server_helpers import Raw, Served, short_dir

ROOT = Path(__file__).resolve().parent.parent
LONG = wire(greedy(200))  # stays in flight for a good while
SHORT = wire(greedy(8))


@pytest.fixture(scope="module")
def served(tiny):
    s = Served(tiny)
    yield s
    s.close()


# -- protocol ---------------------------------------------------------------------

def test_param_types_match_sampling_params():
    assert set(protocol.PARAM_TYPES) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_frames_round_trip_and_decoding_is_strict():
    message = {"op": "generate", "id": "x", "prompt": "héllo", "params": {"stop": ["\n"]}}
    encoded = protocol.encode(message)
    assert protocol.HEADER.unpack(encoded[:4])[0] == len(encoded) - 4
    assert protocol.decode(encoded[4:]) == message
    for bad in (msgpack.packb(msgpack.ExtType(1, b"x")), msgpack.packb({1: "int key"}), msgpack.packb([1]), b"\xc1"):
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.decode(bad)
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


def test_abort_and_early_exit(served):
    async def main():
        async with AsyncClient(served.path) as client:
            outs = []
            async for out in client.generate(PROMPT, LONG, request_id="long"):
                outs.append(out)
                if len(outs) == 2:
                    assert await client.abort("long") is True
            assert outs[-1].finish_reason == "abort" and outs[-1].num_output_tokens < 200
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


async def until(condition, timeout: float = 30.0) -> None:
    """Yield to the server's loop until condition() holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0)


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

        # A second server on the same engine, shutting down while a request runs: new work is refused.
        other = served.start_server(os.path.join(short_dir(), "o.sock"), grace_period=30)
        raw = Raw(other.options.socket_path)
        raw.send({**gen, "id": "running", "params": {**LONG, "max_tokens": 40}})
        assert raw.recv()["type"] == "output"
        gate.hold()  # "running" cannot finish before "late" has been refused
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


def test_disconnect_mid_stream_frees_blocks(served):
    raw = Raw(served.path)
    for i in range(3):
        raw.send({"op": "generate", "id": f"d{i}", "prompt": PROMPT * (i + 1), "params": LONG})
    for _ in range(6):
        assert raw.recv()["type"] == "output"
    assert served.engine.blocks.num_free < served.engine.blocks.num_blocks
    raw.close()
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
        done = subprocess.run(cli + ["client", "--socket", path, "--raw", "--max-tokens", "5", "hello world"],
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


def test_examples_runner_passes_on_a_tiny_model(tiny):
    listed = subprocess.run([sys.executable, "-m", "examples", "--list"], cwd=ROOT, capture_output=True, text=True)
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"quickstart", "chat_stream", "shared_prefix", "parallel_sampling", "abort", "stats", "openai_client"} <= names
    done = subprocess.run([sys.executable, "-m", "examples", "--model", tiny], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(names)} passed, 0 failed" in done.stdout
