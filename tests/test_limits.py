"""Resource limits: each is enforced with its stable error code, per connection where it says so, and the
server goes on serving everyone else."""
from __future__ import annotations

import os
import stat
import time

import pytest

from kvmux.config import EngineConfig
from kvmux.sampling import MAX_N
from kvmux.serve.client import Client, ServerError

from engine_helpers import PROMPT, ForwardGate, greedy, wire
from server_helpers import Raw, Served

LONG = wire(greedy(10))


@pytest.fixture(scope="module")
def served(tiny):
    s = Served(tiny, {"max_pending": 3, "max_prompt_tokens": 20, "max_tokens_limit": 10},
               max_inflight_per_connection=2, write_timeout=0.5)
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
