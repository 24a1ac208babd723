"""Resource limits: each is enforced with its stable error code, per connection where it says so, and the
server goes on serving everyone else."""
from __future__ import annotations

import asyncio
import os
import stat
import time
import tracemalloc

import pytest

from kvmux.config import EngineConfig
from kvmux.sampling import MAX_N, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS
from kvmux.serve.client import Client, ServerError

from engine_helpers import PROMPT, ForwardGate, greedy, random_prompt, wire
from server_helpers import Raw, Served, step_until

LONG = wire(greedy(10))
KIB = 1 << 10
# What docs/protocol.md promises one request pins, with its lists at their limits: this much, plus TOKEN_BYTES for
# each token of its prompt and max_tokens (per sample).
REQUEST_BYTES = 40 * KIB
TOKEN_BYTES = 100
# And one connection beyond its requests: a frame being read, its unsent answers, its own bookkeeping.
CONNECTION_BYTES = 256 * KIB
# Stop lists at their limits: 4-byte characters are the largest a str can hold.
BIGGEST_LISTS = {"stop": [chr(0x10000 + i) * MAX_STOP_CHARS for i in range(MAX_STOP)],
                 "stop_token_ids": list(range(1000, 1000 + MAX_STOP_TOKEN_IDS))}


class Traced:
    """Python memory allocated in this process (the server's thread included) since the block began and not
    freed: what requests pin, measured with tracemalloc."""

    def __enter__(self) -> "Traced":
        tracemalloc.start()
        self.base = tracemalloc.get_traced_memory()[0]
        return self

    def held(self) -> int:
        return tracemalloc.get_traced_memory()[0] - self.base

    def __exit__(self, *exc) -> None:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def served(tiny):
    s = Served(tiny, {"max_pending": 3, "max_prompt_tokens": 20, "max_tokens_limit": 10},
               max_inflight_per_connection=2, write_timeout=0.5)
    yield s
    s.close()


@pytest.fixture(scope="module")
def roomy(tiny):
    """Frames of the default size (and time to send them with tracemalloc on), a pool that holds every request it
    admits, 4 in flight per connection."""
    s = Served(tiny, {"max_pending": 12, "num_blocks": 512}, max_frame=1 << 20, read_timeout=30,
               max_inflight_per_connection=4)
    with Client(s.path) as client:  # warm: what the first request builds once is not what requests pin
        client.complete(PROMPT, {**greedy(4).__dict__, **BIGGEST_LISTS})
    yield s
    s.close()


def code_of(client: Client, prompt, params) -> str:
    with pytest.raises(ServerError) as info:
        client.complete(prompt, params)
    return info.value.code


def test_prompt_output_and_n_limits(served):
    with Client(served.path) as client:
        assert code_of(client, list(range(3, 24)), LONG) == "prompt_too_long"  # 21 > 20 tokens
        assert code_of(client, "hello world " * 20, LONG) == "prompt_too_long"  # text counts after tokenizing
        assert client.complete(list(range(3, 23)), LONG).num_output_tokens == 10  # exactly at both limits
        assert code_of(client, PROMPT, {**LONG, "max_tokens": 11}) == "invalid_params"
        with pytest.raises(ServerError, match=f"n must be an integer in \\[1, {MAX_N}\\]") as info:
            client.complete(PROMPT, {**LONG, "n": MAX_N + 1})  # one bound, SamplingParams.MAX_N, for every caller
        assert info.value.code == "invalid_params"
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        EngineConfig(max_prompt_tokens=0).validate()
    served.settle()


def test_in_flight_per_connection_and_total_waiting_bound(served):
    a, b = Raw(served.path), Raw(served.path)
    with ForwardGate(served.engine) as gate:  # nothing finishes until the limits have been hit
        for i in range(2):
            a.send({"op": "generate", "id": f"a{i}", "prompt": PROMPT, "params": LONG})
        # The third on the same connection is refused; an abort is never refused (it is how to make room).
        a.send({"op": "generate", "id": "a2", "prompt": PROMPT, "params": LONG})
        a.send({"op": "abort", "id": "x", "target": "a0"})
        b.send({"op": "generate", "id": "b0", "prompt": PROMPT, "params": LONG})
        frames = {}
        while len(frames) < 2:
            frame = a.recv()
            frames[frame["id"]] = frame
        assert frames["a2"]["code"] == "too_many_requests"
        assert frames["x"]["data"] == {"target": "a0", "aborted": True}
        gate.release()
        assert a.until_finished("a0")["finish_reason"] == "abort"
        assert a.until_finished("a1")["finish_reason"] == "length"
        assert b.until_finished("b0")["finish_reason"] == "length"  # another connection is not limited by a's count
    a.close(), b.close()
    served.settle()

    # Engine-wide bound across connections: three connections fill max_pending, the fourth is overloaded.
    raws = [Raw(served.path) for _ in range(4)]
    with ForwardGate(served.engine) as gate:
        for raw in raws[:3]:
            raw.send({"op": "generate", "id": "g", "prompt": PROMPT, "params": LONG})
        served.wait_for(lambda s: s["requests_live"] == 3)
        raws[3].send({"op": "generate", "id": "g", "prompt": PROMPT, "params": LONG})
        assert raws[3].recv()["code"] == "overloaded"
        gate.release()
        assert all(raw.until_finished("g")["finish_reason"] == "length" for raw in raws[:3])
    for raw in raws:
        raw.close()
    served.settle()


def test_a_client_that_stops_reading_is_disconnected(served):
    """Answers a client never reads cannot pile up forever: past the write timeout the connection is closed."""
    stuck = Raw(served.path, timeout=0.2)
    stuck.sock.setblocking(False)
    sent, started = 0, time.monotonic()
    frame = b'\x82\xa2op\xa6health\xa2id\xa1h'  # msgpack {"op": "health", "id": "h"}
    while time.monotonic() - started < 10:
        try:
            sent += stuck.sock.send(len(frame).to_bytes(4, "big") + frame)
        except BlockingIOError:
            time.sleep(0.01)  # the server stopped reading us: its writes to us are blocked
        except (BrokenPipeError, ConnectionResetError):
            break  # disconnected, as it should be
    else:
        pytest.fail("the server never gave up on a client that does not read")
    assert sent > 0
    with Client(served.path) as client:  # everyone else is served throughout
        assert client.complete(PROMPT, LONG).num_output_tokens == 10
        assert client.stats()["connections"] == 1
    stuck.close()
    served.settle()


def test_socket_is_owner_only_by_default(served):
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600


def test_what_one_request_carries_is_bounded(roomy):
    """Every list a request carries has a limit (kvmux.sampling, so every front end has it), refused with
    invalid_params naming it; the frames of issue 13 (330,000 stop_token_ids in 0.94 MiB) pin nothing."""
    raw = Raw(roomy.path, timeout=60)

    def refused(params: dict) -> str:
        raw.send({"op": "generate", "id": "r", "prompt": PROMPT, "params": {**LONG, **params}})
        frame = raw.recv()
        assert (frame["type"], frame["code"]) == ("error", "invalid_params"), frame
        return frame["message"]

    stop, ids = BIGGEST_LISTS["stop"], BIGGEST_LISTS["stop_token_ids"]
    assert f"at most {MAX_STOP} strings" in refused({"stop": stop + ["x"]})
    assert f"at most {MAX_STOP_CHARS} characters" in refused({"stop": ["x" * (MAX_STOP_CHARS + 1)]})
    assert f"at most {MAX_STOP_TOKEN_IDS} token ids" in refused({"stop_token_ids": ids + [7]})
    assert "integers in [0, 2147483648)" in refused({"stop_token_ids": [2**31]})
    raw.send({"op": "generate", "id": "ok", "prompt": PROMPT, "params": {**LONG, **BIGGEST_LISTS}})
    assert raw.until_finished("ok")["finish_reason"] == "length"  # exactly at every limit

    attack = {"op": "generate", "id": "a", "prompt": PROMPT, "params": {**LONG, "stop_token_ids": [40000] * 330_000}}
    with Traced() as traced:
        for i in range(8):
            assert "at most" in refused(attack["params"])
        pinned = traced.held()
    assert pinned < 2 << 20, f"8 refused requests still pin {pinned / 2**20:.1f} MiB"
    raw.close()
    roomy.settle()


def test_memory_requests_pin_is_bounded_per_connection_and_globally(roomy):
    """Requests at every limit, from clients that read nothing while the engine runs them: one connection pins
    at most its in-flight limit times the per-request bound (plus its buffers), all of them max_pending times it."""
    prompt, max_tokens = random_prompt(13, 200), 16
    params = {**wire(greedy(max_tokens)), **BIGGEST_LISTS}
    per_request = REQUEST_BYTES + TOKEN_BYTES * (len(prompt) + max_tokens)
    per_connection = roomy.server.options.max_inflight_per_connection
    pending = roomy.engine.config.max_pending
    conns = [Raw(roomy.path, timeout=60) for _ in range(pending // per_connection)]
    with ForwardGate(roomy.engine) as gate:
        with Traced() as traced:
            for i in range(per_connection):
                conns[0].send({"op": "generate", "id": f"g{i}", "prompt": prompt, "params": params})
            roomy.wait_for(lambda s: s["requests_live"] == per_connection)
            one = traced.held()
            for raw in conns[1:]:
                for i in range(per_connection):
                    raw.send({"op": "generate", "id": f"g{i}", "prompt": prompt, "params": params})
            # Every request running, most of their tokens out (a step may run several forwards: counted in
            # tokens), no answer read.
            first = step_until(roomy, gate, lambda s: s["requests_live"] == pending and s["running"] == pending)
            step_until(roomy, gate, lambda s: s["output_tokens"] >= first["output_tokens"] + pending * (max_tokens - 6))
            every = traced.held()
    assert one <= per_connection * per_request + CONNECTION_BYTES, (
        f"one connection pins {one / KIB:.0f} KiB, bound {(per_connection * per_request + CONNECTION_BYTES) / KIB:.0f}")
    bound = pending * per_request + len(conns) * CONNECTION_BYTES
    assert every <= bound, f"all requests pin {every / KIB:.0f} KiB, bound {bound / KIB:.0f} KiB"
    for raw in conns:
        last = raw.until_finished(*(f"g{i}" for i in range(per_connection)))
        assert all(f["finish_reason"] == "length" for f in last.values())
        raw.close()
    roomy.settle()


def test_a_refused_frame_is_not_held_while_its_refusal_waits(roomy):
    """A 1 MiB frame of empty arrays decodes to ~60 MiB. Refused, its answer waits behind those of a client that
    does not read; the decoded frame must not be held meanwhile (a connection would pin 60x its frame limit)."""
    raw = Raw(roomy.path, timeout=120)
    # 16 samples of 240 tokens: more answers than the socket and the server's buffer hold, so that (with asyncio's
    # 64 KiB high-water mark passed) the server's writes to us wait.
    raw.send({"op": "generate", "id": "g", "prompt": PROMPT, "params": {**wire(greedy(240)), "n": 16}})
    roomy.call(until(lambda: roomy.server.stats_data(), lambda s: s["unsent_bytes"] > 64 * KIB))
    head = b"\x83\xa2op\xa5stats\xa2id\xa1e\xa1a\xdd"  # {"op": "stats", "id": "e", "a": [...]}
    empties = roomy.server.options.max_frame - len(head) - 4
    body = head + empties.to_bytes(4, "big") + b"\x90" * empties
    received = roomy.call(roomy.server.stats_data())["frames_received"]
    with Traced() as traced:
        raw.send_bytes(body)  # refused for its unknown field "a", once the answers before it have gone
        roomy.call(until(lambda: roomy.server.stats_data(), lambda s: s["frames_received"] > received))
        held = traced.held()
    assert held < 8 << 20, f"{held / 2**20:.0f} MiB held while the refusal waits"
    raw.close()
    roomy.settle()


async def until(poll, predicate, timeout: float = 60.0) -> dict:
    """poll() on the server's loop until predicate(its result) holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate(result := await poll()):
        assert asyncio.get_running_loop().time() < deadline, f"never reached: {result}"
        await asyncio.sleep(0.005)
    return result


def test_a_caller_that_lags_gets_bigger_pieces_not_more(roomy):
    """Outputs a caller has not taken yet are merged, so one that stops reading pins its request's tokens, not a
    piece per token for as long as it lags."""
    engine = roomy.engine

    async def lagging():
        stream = engine.generate(PROMPT, greedy(30))
        first = await anext(stream)
        while engine.admission.live:  # the request ends in the engine while nobody reads its stream
            await asyncio.sleep(0.005)
        return [first] + [out async for out in stream]

    pieces = roomy.call(lagging())
    assert len(pieces) == 2 and pieces[1].finished and pieces[1].finish_reason == "length"
    assert [len(p.token_ids) for p in pieces] == [1, 29] and pieces[1].num_output_tokens == 30
    alone = roomy.call(engine.complete(PROMPT, greedy(30)))
    assert pieces[0].token_ids + pieces[1].token_ids == alone.token_ids
    assert pieces[0].text + pieces[1].text == alone.text
    roomy.settle()
