"""Folders kvmux derives from a model once and keeps under ~/.cache/kvmux (or $KVMUX_CACHE_DIR): a GGUF's
dequantized copy, its metadata, a tokenizer as transformers sets it up. Each is keyed by a hash of what it was
derived from, so a changed source gets a new entry."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("KVMUX_CACHE_DIR") or Path.home() / ".cache" / "kvmux")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    buffer = bytearray(1 << 20)  # one buffer reused: hashing a model file must not raise the process's peak RSS
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def cached_folder(key: str, build) -> Path:
    """Return cache_root()/key, calling build(tmp_dir) to create it if absent.

    The folder is built under a temporary name and renamed into place, so a
    crash mid-build never leaves a half-written cache entry behind.
    """
    final = cache_root() / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is an ordinary folder
        os.rename(tmp, final)
    except OSError:
        # Lost a race with another process that built the same entry: use theirs.
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
