"""What a model is, read without loading it: where it lives and its context length.

The engine checks its settings against the model before the (slow) load, so a
bad --max-model-len fails in a second, not after the weights are in memory.
A GGUF file's metadata sits at its start; only that part is read (gguf's
reader would parse every tensor and the whole vocabulary first).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

# GGUF metadata value types: fixed-size scalars by struct format, then string (8) and array (9).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")


def _value(f, kind: int):
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        return [_value(f, item) for _ in range(count)]
    raise ValueError(f"unknown GGUF metadata type {kind}")


def gguf_metadata(path: Path, wanted: set[str]) -> dict:
    """The wanted metadata keys of a GGUF file (those present), reading no further than the last of them."""
    found = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic number)")
        _read(f, "<I")  # version
        _read(f, "<Q")  # tensor count
        for _ in range(_read(f, "<Q")):
            key = _string(f)
            value = _value(f, _read(f, "<I"))
            if key in wanted:
                found[key] = value
                if len(found) == len(wanted):
                    break
    return found


def context_length(source: Path) -> int | None:
    """The model's context length from its config.json or GGUF metadata; None where it does not say."""
    if source.is_file():
        arch = gguf_metadata(source, {"general.architecture"}).get("general.architecture")
        return gguf_metadata(source, {f"{arch}.context_length"}).get(f"{arch}.context_length") if arch else None
    config = source / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
