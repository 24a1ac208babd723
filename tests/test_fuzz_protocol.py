"""Fuzzing the socket protocol: arbitrary bytes, truncated frames, wrong lengths, deep or huge msgpack values,
wrong types for every field, maps with bin or mixed str and bin keys, and sequences of valid and invalid operations. The server answers each with an
error frame or a clean disconnect, never an internal error, never hangs a connection, and a well-behaved
client on another connection keeps getting the right outputs throughout."""
from __future__ import annotations

import threading
import time
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmux.serve import protocol
from kvmux.serve.client import Client

from server_helpers import Raw, Served
from tiny_model import make_tiny_model

PROMPT = [5, 17, 33, 101, 250, 7, 9]
SHORT = {"max_tokens": 3, "temperature": 0, "ignore_eos": True, "seed": 0}
# The server draws a seed for a request without one from the random module, in its own thread, while
# hypothesis generates; hypothesis mistakes that for a strategy using random.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
MAX_FRAME = 8192
READ_TIMEOUT = 0.3
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# What a request's answer may be refused with; internal_error would be a server bug.
REQUEST_CODES = set(protocol.ERROR_CODES) - {"internal_error", "frame_too_large", "frame_timeout", "shutting_down",
                                             "too_many_connections"}

# Map keys: str as the protocol says, bin (bytes) as msgpack also allows, and so maps mixing the two.
map_keys = st.text(max_size=6) | st.binary(max_size=6)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(map_keys, inner, max_size=4),
    max_leaves=12)


class Bystander(threading.Thread):
    """A well-behaved client on its own connection, generating greedily over and over and checking every output."""

    def __init__(self, path: str, expected: list[int]) -> None:
        super().__init__(daemon=True)
        self.path, self.expected = path, expected
        self.stop, self.runs, self.failures = threading.Event(), 0, []

    def run(self) -> None:
        with Client(self.path) as client:
            while not self.stop.is_set():
                try:
                    got = client.complete(PROMPT, SHORT).token_ids
                    if got != self.expected:
                        self.failures.append(f"got {got}, expected {self.expected}")
                except Exception as exc:  # noqa: BLE001 - any failure is what this thread reports
                    self.failures.append(repr(exc))
                self.runs += 1
                time.sleep(0.02)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tiny = str(make_tiny_model(tmp_path_factory.mktemp("fuzz") / "m"))
    s = Served(tiny, {"max_pending": 64}, read_timeout=READ_TIMEOUT, max_frame=MAX_FRAME)
    with Client(s.path) as client:
        expected = client.complete(PROMPT, SHORT).token_ids
    bystander = Bystander(s.path, expected)
    bystander.start()
    yield s
    bystander.stop.set()
    bystander.join(timeout=30)
    assert bystander.runs > 0 and not bystander.failures, bystander.failures[:5]
    s.settle()
    s.close()


def check_frame(frame: dict) -> None:
    assert frame["type"] in ("error", "output", "result"), frame
    if frame["type"] == "error":
        assert frame["code"] in REQUEST_CODES or frame["id"] is None and frame["code"] in protocol.ERROR_CODES, frame
        assert frame["code"] != "internal_error", frame


def answered_until_probe(raw: Raw) -> list[dict] | None:
    """Send a health probe and read up to its answer; None if the server closed the connection instead."""
    try:
        raw.send({"op": "health", "id": "probe"})
    except (BrokenPipeError, ConnectionResetError):
        return None
    frames = []
    while True:
        frame = raw.recv()
        if frame is None:
            return None
        check_frame(frame)
        if frame["id"] == "probe" and frame["type"] == "result":
            return frames
        frames.append(frame)


@FUZZ
@given(body=st.binary(max_size=300))
def test_arbitrary_frame_bodies(served, body):
    raw = Raw(served.path, timeout=5)
    raw.send_bytes(body)
    frames = answered_until_probe(raw)  # a whole frame never closes the connection
    assert frames is not None
    raw.close()


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_byte_streams_end_in_an_answer_or_a_close(served, data):
    """Unframed bytes: wrong lengths, truncated frames. Nothing can hold the connection past the read timeout."""
    raw = Raw(served.path, timeout=5)
    started = time.monotonic()
    raw.sock.sendall(data)
    answered_until_probe(raw)  # either the probe is answered or the server closed the connection
    assert time.monotonic() - started < 4
    raw.close()


def base_message(op: str) -> dict:
    return {"generate": {"op": "generate", "id": "f", "prompt": PROMPT, "params": dict(SHORT), "priority": 0},
            "abort": {"op": "abort", "id": "f", "target": "nothing"}}.get(op, {"op": op, "id": "f"})


FIELDS = {"generate": ["op", "id", "prompt", "params", "priority", "extra"], "abort": ["op", "id", "target", "extra"],
          "stats": ["op", "id", "extra"], "health": ["op", "id"], "model": ["op", "id"]}


@st.composite
def mistyped(draw):
    """A valid request with one field (or one sampling parameter) replaced by an arbitrary value."""
    op = draw(st.sampled_from(sorted(FIELDS)))
    message = base_message(op)
    if op == "generate" and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(protocol.PARAM_TYPES) + ["bogus"]))
        message["params"][name] = draw(msgpack_values)
    else:
        message[draw(st.sampled_from(FIELDS[op]))] = draw(msgpack_values)
    return message


@FUZZ
@given(message=mistyped())
def test_wrong_types_for_every_field(served, message):
    raw = Raw(served.path, timeout=20)
    raw.send_bytes(msgpack.packb(message, use_bin_type=True))
    frames = answered_until_probe(raw)
    assert frames is not None
    # A value that happened to be valid runs to its end: read every sample's last frame.
    ends = [f for f in frames if f["type"] != "output" or f["finished"]]
    samples = message.get("params", {}).get("n", 1) if isinstance(message.get("params"), dict) else 1
    if frames and frames[0]["type"] == "output":
        while len(ends) < samples:
            frame = raw.recv()
            check_frame(frame)
            if frame["type"] != "output" or frame["finished"]:
                ends.append(frame)
    raw.close()
    served.settle()


@st.composite
def bin_keyed(draw):
    """A valid request some of whose keys (at its top or in its params) are bin instead of str, or with bin
    keys added beside its str ones."""
    op = draw(st.sampled_from(sorted(FIELDS)))
    message = base_message(op)
    target = message["params"] if op == "generate" and draw(st.booleans()) else message
    for key in draw(st.lists(st.sampled_from(sorted(target)), unique=True, max_size=3)):
        target[key.encode()] = target.pop(key)
    for key in draw(st.lists(map_keys, max_size=3)):
        target[key] = draw(msgpack_values)
    if all(isinstance(key, str) for key in target):
        target[draw(st.binary(max_size=6))] = draw(msgpack_values)
    return message


@FUZZ
@given(message=bin_keyed())
def test_bin_and_mixed_keys_are_malformed_and_spare_the_connection(served, message):
    """Keys are str: any bin key, anywhere, is malformed_frame (no id can be trusted), and the request already in
    flight on the same connection runs to its end."""
    raw = Raw(served.path, timeout=20)
    raw.send({"op": "generate", "id": "first", "prompt": PROMPT, "params": SHORT})
    raw.send_bytes(msgpack.packb(message, use_bin_type=True))
    frames = answered_until_probe(raw)
    assert frames is not None
    errors = [f for f in frames if f["type"] == "error"]
    assert [(f["code"], f["id"]) for f in errors] == [("malformed_frame", None)], errors
    ended = [f for f in frames if f["id"] == "first" and f["finished"]]
    while not ended:
        frame = raw.recv()
        check_frame(frame)
        ended = [frame] if frame["id"] == "first" and frame["finished"] else []
    assert ended[0]["finish_reason"] == "length"
    raw.close()
    served.settle()


operations = st.one_of(
    st.builds(lambda i, n: {"op": "generate", "id": f"g{i}", "prompt": PROMPT, "params": {**SHORT, "n": n}},
              st.integers(0, 3), st.integers(1, 2)),
    st.builds(lambda i: {"op": "generate", "id": f"g{i}", "prompt": [], "params": SHORT}, st.integers(0, 3)),
    st.builds(lambda i, t: {"op": "abort", "id": f"a{i}", "target": f"g{t}"}, st.integers(0, 3), st.integers(0, 3)),
    st.sampled_from([{"op": "stats", "id": "s"}, {"op": "model", "id": "m"}, {"op": "fly", "id": "x"},
                     {"op": "health", "id": "k", b"x": 1, "y": 2}]),
    st.binary(max_size=40),
)


@FUZZ
@given(ops=st.lists(operations, min_size=1, max_size=8))
def test_sequences_of_valid_and_invalid_operations(served, ops):
    raw = Raw(served.path, timeout=20)
    for op in ops:
        raw.send_bytes(op if isinstance(op, bytes) else msgpack.packb(op))
    assert answered_until_probe(raw) is not None
    raw.close()  # whatever is still running is aborted by the disconnect
    served.settle()


def test_deep_huge_and_ext_values(served):
    raw = Raw(served.path)

    def code(body: bytes) -> str:
        raw.send_bytes(body)
        frame = raw.recv()
        assert frame["type"] == "error", frame
        return frame["code"]

    deep = b"\x81\xa6prompt" + b"\x91" * (MAX_FRAME - 20) + b"\xc0"  # nested far past msgpack's stack limit
    assert code(deep) == "malformed_frame"
    nested = {"op": "generate", "id": "n", "prompt": [[[[[[[[1]]]]]]]]}
    assert code(msgpack.packb(nested)) == "invalid_field"
    wide = {"op": "stats", "id": "w", **{f"k{i}": i for i in range(900)}}
    assert code(msgpack.packb(wide)) == "invalid_field"
    claims = b"\xdd\xff\xff\xff\xff" + b"\xc0" * 10  # an array of 4 billion items in 15 bytes
    assert code(claims) == "malformed_frame"
    for ext in (msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)):  # the timestamp is ext type -1
        assert code(msgpack.packb({"op": "stats", "id": "t", "x": [ext]}, datetime=False)) == "malformed_frame"
    long_text = {"op": "generate", "id": "l", "prompt": "x" * (MAX_FRAME - 100), "params": SHORT}
    assert code(msgpack.packb(long_text)) == "prompt_too_long"
    raw.sock.sendall(protocol.HEADER.pack(MAX_FRAME + 1))  # refused from the header alone, nothing read
    assert raw.recv()["code"] == "frame_too_large" and raw.recv() is None
    raw.close()


def test_trickled_frame_is_cut_off(served):
    """A peer trickling a frame byte by byte cannot hold the connection past the read timeout."""
    raw = Raw(served.path)
    raw.sock.sendall(protocol.HEADER.pack(100))
    started = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):
            raw.sock.sendall(b"\xc0")
            time.sleep(0.05)
    closed = time.monotonic() - started
    # Slack for a loaded machine: a deadline that each byte renews never cuts, and fails in pytest.raises.
    assert closed < READ_TIMEOUT + 3.0
    raw.close()


def test_decoding_one_frame_is_bounded():
    """Decoding is synchronous, so one frame at a time expands; the worst case (a frame of empty arrays) stays
    within 80 times the frame's size, and its objects are freed as soon as validation refuses it."""
    body = b"\x81\xa1a\xdd" + (MAX_FRAME * 8).to_bytes(4, "big") + b"\x90" * (MAX_FRAME * 8)
    tracemalloc.start()
    protocol.unpack_frame(body)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 80 * len(body)


def test_no_pickle_anywhere_on_the_wire():
    import kvmux.serve.client
    import kvmux.serve.server
    for module in (protocol, kvmux.serve.server, kvmux.serve.client):
        source = open(module.__file__).read()
        assert "pickle" not in source and "marshal" not in source and "object_hook" not in source
