"""The socket protocol: framing, error codes and request validation, shared by server and client.

A frame is a 4-byte big-endian length followed by that many bytes holding one
msgpack map. docs/protocol.md is the specification; this module is the one
place that encodes and decodes frames. It imports neither torch nor the
engine, so the client library stays light.
"""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvmux.outputs import KvmuxError, RequestOutput
from kvmux.sampling import StructuredOutputs

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20  # bytes of one frame's body
DEFAULT_READ_TIMEOUT = 10.0  # seconds to receive the rest of a frame once its first byte arrived
MAX_ID_LEN = 256

# Every error code a server sends, with what it means. The server sends no other code.
ERROR_CODES = {
    "malformed_frame": "the frame body is not a msgpack map with str keys (or uses ext types); the connection stays open",
    "frame_too_large": "the length header exceeds the server's maximum frame size; the connection is closed",
    "frame_timeout": "a frame was only partly received within the read timeout; the connection is closed",
    "unknown_op": "the op field names no operation",
    "missing_field": "a required field is absent",
    "invalid_field": "a field has the wrong type or value, or is not a field of this op",
    "invalid_prompt": "the prompt is empty or holds token ids outside the vocabulary",
    "invalid_params": "a sampling parameter (or the cache salt) is out of range",
    "prompt_too_long": "the prompt exceeds the prompt limit, or prompt + max_tokens exceed the context or the KV pool",
    "duplicate_request_id": "the id is already in flight on this connection",
    "too_many_requests": "this connection already has its maximum of requests in flight; wait for one to end",
    "too_many_connections": "the server already has its maximum of connections open; the connection is closed",
    "overloaded": "too many requests are waiting; retry later",
    "shutting_down": "the server is stopping and admits no new requests",
    "not_running": "the engine behind the server is not running (it was stopped)",
    "engine_dead": "an actor of the engine crashed; every request in flight fails with this code",
    "internal_error": "the server failed while handling the request",
}

OPS = ("generate", "abort", "stats", "health", "model")

# Sampling fields a client may set, with their accepted msgpack types. They
# mirror kvmux.sampling.SamplingParams (a test keeps the two in step); the
# engine validates the values.
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "max_tokens": (int, type(None)),  # nil: as many as the context leaves
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "min_p": (int, float),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "seed": (int, type(None)),
    "stop": (list,),
    "stop_token_ids": (list,),
    "ignore_eos": (bool,),
    "n": (int,),  # parallel samples; each output frame says which one by its index
    "logprobs": (int, type(None)),  # output frames then carry logprobs and top_logprobs
    "structured_outputs": (dict, type(None)),  # a map of StructuredOutputs fields: json, regex, choice, ...
}


class ProtocolError(KvmuxError):
    """A frame or message the peer got wrong; `code` is one of ERROR_CODES.

    fatal means the byte stream can no longer be split into frames, so the
    connection must close after reporting it.
    """

    def __init__(self, code: str, message: str, *, request_id: str | None = None, fatal: bool = False) -> None:
        super().__init__(code, message)
        self.request_id = request_id
        self.fatal = fatal


# -- framing -------------------------------------------------------------------

def _no_ext(code: int, data: bytes):
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _refuse_what_msgpack_lets_through(value) -> None:
    """Raise ProtocolError(malformed_frame) for what unpackb decodes but the protocol refuses, anywhere in value.

    Map keys must be str: strict_map_key also lets bin keys through (as bytes), and a frame mixing the two could
    not even have its unknown fields sorted. And msgpack decodes ext type -1 (timestamp) itself, without
    calling ext_hook. Iterative, because a frame may nest as deep as msgpack allows.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            bad = next((key for key in item if not isinstance(key, str)), None)
            if bad is not None:
                raise ProtocolError("malformed_frame", f"map keys must be msgpack str, got a {type(bad).__name__} "
                                                       f"key {bad!r:.60}")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, msgpack.Timestamp):
            raise ProtocolError("malformed_frame", "msgpack ext types (here a timestamp) are not allowed")


def pack_frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack_frame(body: bytes) -> dict:
    """One frame body to a dict; raises ProtocolError(malformed_frame)."""
    try:
        # unpackb caps every string, list and map length at the body's size, so nothing can claim more memory,
        # and refuses nesting deeper than its own stack limit. No object hooks: only plain msgpack values come out.
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("malformed_frame",
                            f"frame body is not valid msgpack: {type(exc).__name__}: {exc or 'unpack failed'}") from None
    if not isinstance(message, dict):
        raise ProtocolError("malformed_frame", f"frame body must be a msgpack map, got {type(message).__name__}")
    _refuse_what_msgpack_lets_through(message)
    return message


async def read_frame(reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME,
                     timeout: float | None = DEFAULT_READ_TIMEOUT) -> dict | None:
    """Read one frame; None at a clean end of stream (between frames).

    The size is checked before the body is read, so an oversized frame costs
    no memory. Once a frame has begun, all of it, header and body, must arrive
    within `timeout` of its first byte (one deadline per frame), so that a
    stalled or trickling peer cannot hold a half-read frame for longer.
    """
    try:
        first = await reader.read(1)
    except ConnectionError:
        return None
    if not first:
        return None
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - loop.time())

    try:
        rest = await asyncio.wait_for(reader.readexactly(HEADER.size - 1), left())
        (size,) = HEADER.unpack(first + rest)
        if size > max_frame:
            raise ProtocolError("frame_too_large", f"frame of {size} bytes exceeds the maximum of {max_frame} bytes",
                                fatal=True)
        body = await asyncio.wait_for(reader.readexactly(size), left())
    except asyncio.TimeoutError:
        raise ProtocolError("frame_timeout", f"a frame was not completed within {timeout} s of its first byte",
                            fatal=True) from None
    except asyncio.IncompleteReadError:
        raise ProtocolError("malformed_frame", "the connection closed in the middle of a frame", fatal=True) from None
    return unpack_frame(body)


# -- messages --------------------------------------------------------------------

@dataclass
class GenerateOp:
    request_id: str  # the frame's "id"
    prompt: str | list
    params: dict = field(default_factory=dict)  # SamplingParams fields
    priority: int = 0
    cache_salt: str | None = None


@dataclass
class AbortOp:
    request_id: str  # the frame's "id": the abort's own, which its result frame carries
    target_request_id: str  # the frame's "target": the request_id of the generate request to abort


@dataclass
class QueryOp:
    """stats, health or model: no arguments, one result."""

    request_id: str
    name: str  # the frame's "op"


Op = GenerateOp | AbortOp | QueryOp


def _field(message: dict, name: str, types: tuple[type, ...], what: str, request_id: str | None, default=...):
    if name not in message:
        if default is not ...:
            return default
        raise ProtocolError("missing_field", f"field {name!r} ({what}) is required", request_id=request_id)
    value = message[name]
    # bool is an int subclass; a flag is never a valid number here.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ProtocolError("invalid_field", f"field {name!r} must be {what}, got {type(value).__name__}",
                            request_id=request_id)
    return value


def _check_fields(message: dict, allowed: set[str], op: str, request_id: str) -> None:
    unknown = sorted(set(message) - allowed, key=repr)  # repr: total even for keys of mixed types
    if unknown:
        raise ProtocolError("invalid_field", f"{op} has no field(s) {', '.join(map(repr, unknown))}; "
                                             f"its fields are {', '.join(sorted(allowed))}", request_id=request_id)


def _prompt(value: Any, request_id: str) -> str | list:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and set(m) == {"role", "content"}
            and isinstance(m["role"], str) and isinstance(m["content"], str) for m in value):
        return value
    raise ProtocolError("invalid_field", "field 'prompt' must be a string, a non-empty list of token ids, or a "
                                         "non-empty list of {role: str, content: str} messages", request_id=request_id)


def _params(value: dict, request_id: str) -> dict:
    params = {}
    for name in value:
        if name not in PARAM_TYPES:
            raise ProtocolError("invalid_field", f"params has no field {name!r}; its fields are "
                                                 f"{', '.join(sorted(PARAM_TYPES))}", request_id=request_id)
        names = "/".join("nil" if t is type(None) else t.__name__ for t in PARAM_TYPES[name])
        params[name] = _field(value, name, PARAM_TYPES[name], names, request_id)
    constraint = params.get("structured_outputs")
    if constraint is not None:
        try:
            params["structured_outputs"] = StructuredOutputs.from_map(constraint)  # the engine checks the values
        except ValueError as exc:
            raise ProtocolError("invalid_field", str(exc), request_id=request_id) from None
    return params


def parse_op(message: dict) -> Op:
    """Validate a decoded client frame; raises ProtocolError naming the first problem."""
    op = _field(message, "op", (str,), f"one of {', '.join(OPS)}", None)
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {op!r}; the ops are {', '.join(OPS)}",
                            request_id=message.get("id") if isinstance(message.get("id"), str) else None)
    request_id = _field(message, "id", (str,), "a string chosen by the client", None)
    # NUL is refused because the engine names a request's parallel samples "<id>\0<index>": an id holding one
    # could collide with another request's sample.
    if not 0 < len(request_id) <= MAX_ID_LEN or "\0" in request_id:
        raise ProtocolError("invalid_field", f"field 'id' must be 1 to {MAX_ID_LEN} characters, none of them NUL")
    if op == "generate":
        _check_fields(message, {"op", "id", "prompt", "params", "priority", "cache_salt"}, op, request_id)
        prompt = _prompt(_field(message, "prompt", (str, list), "the prompt", request_id), request_id)
        params = _params(_field(message, "params", (dict,), "a map of sampling parameters", request_id, {}),
                         request_id)
        priority = _field(message, "priority", (int,), "an integer", request_id, 0)
        salt = _field(message, "cache_salt", (str, type(None)), "a string or nil", request_id, None)
        return GenerateOp(request_id, prompt, params, priority, salt)
    if op == "abort":
        _check_fields(message, {"op", "id", "target"}, op, request_id)
        return AbortOp(request_id, _field(message, "target", (str,), "the id of a generate request", request_id))
    _check_fields(message, {"op", "id"}, op, request_id)
    return QueryOp(request_id, op)


# -- server frames -----------------------------------------------------------------

_OUTPUT_FIELDS = ("index", "token_ids", "text", "finished", "finish_reason", "num_prompt_tokens",
                  "num_output_tokens", "error", "logprobs", "top_logprobs")


def output_frame(request_id: str, out: RequestOutput) -> dict:
    """The frame for one RequestOutput, under the client's id for its request."""
    return {"type": "output", "id": request_id, **{name: getattr(out, name) for name in _OUTPUT_FIELDS}}


def output_of(frame: dict) -> RequestOutput:
    """The RequestOutput an output frame carries (the inverse of output_frame)."""
    return RequestOutput(request_id=frame["id"], **{name: frame[name] for name in _OUTPUT_FIELDS})


def result_frame(request_id: str, op: str, data: dict) -> dict:
    return {"type": "result", "id": request_id, "op": op, "data": data}


def error_frame(request_id: str | None, code: str, message: str) -> dict:
    if code not in ERROR_CODES:
        # An engine code this protocol does not list (a bug to fix here); keep the original in the message.
        message, code = f"{code}: {message}", "internal_error"
    return {"type": "error", "id": request_id, "code": code, "message": message}
