"""The disk tier: KV blocks in a memory-mapped file that outlives the process, with a journal saying what each
slot holds.

`disk_cache_dir` holds one store per fingerprint (everything that changes a block's bytes: the model file, dtype,
quantization, pool geometry, rotary settings), so an engine only ever reads blocks an engine of the same
settings wrote; the cache salt is in the block hashes themselves. A store is

    DIR/lock                          held (flock) by the engine using DIR; a second engine is refused
    DIR/<fingerprint>/meta.json       what the fingerprint stands for (for `kvmux cache info`)
    DIR/<fingerprint>/pool.bin        slots of block_bytes each: the disk tier's pool tensor
    DIR/<fingerprint>/journal.bin     append-only records: slot s now holds hash h, whose bytes have checksum c

A record is appended after its block's bytes are in the pool file, on the forward thread that copied them, so
the journal never names a block before its bytes were written. Crash safety follows from the checksums rather
than from ordering: after a `kill -9` (or a torn write, or a flipped bit) a slot whose bytes do not match its
last record, and a record that fails its own check, are dropped when the store opens, never served. Opening
replays the journal (the last record of a slot wins; a hit appends a `touch`, so the order of the records is
the blocks' recency), verifies every slot's checksum, and rewrites the journal compactly.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvmux.cache.kv_cache import PoolGeometry

log = logging.getLogger("kvmux")

FORMAT = 2  # of the pool and journal: a change makes every older store another fingerprint (2: int8 slabs)
_RECORD = struct.Struct("<IIQQI")  # slot, kind, hash, checksum, the record's own crc32
_WRITE, _TOUCH = 1, 2


class StoreLocked(RuntimeError):
    """Another engine uses this disk_cache_dir."""


def checksum(data: memoryview | bytes) -> int:
    return zlib.crc32(data)


def _pack(slot: int, kind: int, digest: int, crc: int) -> bytes:
    head = struct.pack("<IIQQ", slot, kind, digest, crc)
    return head + struct.pack("<I", zlib.crc32(head))


@dataclass
class Opened:
    """What opening a store found: the blocks to serve, least recently used first, and what it dropped."""

    blocks: list[tuple[int, int]]  # (slot, hash)
    corrupt: int  # slots whose bytes failed their checksum
    bad_records: int  # journal records that failed their own check

    @classmethod
    def common(cls, opened: list[Opened]) -> Opened:
        """Tensor-parallel ranks' stores, each with its slice of every block: the blocks all of them hold whole
        in the same slot (in the first one's recency order), so a block torn on one rank is served by none. The
        counts are the ranks' together (a slice that failed its checksum is one corrupt block)."""
        everywhere = set.intersection(*(set(o.blocks) for o in opened))
        return cls([b for b in opened[0].blocks if b in everywhere], sum(o.corrupt for o in opened),
                   sum(o.bad_records for o in opened))


class DiskStore:
    COMPACT_SLACK = 4096  # journal records beyond 4 per live slot before it is rewritten

    def __init__(self, folder: str, fingerprint: str, meta: dict, geometry: PoolGeometry, num_blocks: int) -> None:
        self.root = Path(folder)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            raise StoreLocked(f"disk_cache_dir {folder} is in use by another kvmux engine (pid {holder}); "
                              f"give each engine a folder of its own") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.dir = self.root / fingerprint
        self.dir.mkdir(exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps({**meta, "format": FORMAT,
                                                        "block_bytes": geometry.block_bytes}, indent=1) + "\n")
        self.block_bytes = geometry.block_bytes
        self.num_blocks = num_blocks
        pool = self.dir / "pool.bin"
        with open(pool, "a+b") as f:  # created empty, or kept; then sized to this engine's bound
            f.truncate(num_blocks * geometry.block_bytes)
            # The room is taken now: a write into a mapped page the filesystem cannot back would kill the process
            # (SIGBUS) in the middle of a step.
            try:
                os.posix_fallocate(f.fileno(), 0, num_blocks * geometry.block_bytes)
            except OSError as exc:
                self._lock.close()
                raise OSError(f"disk_cache_dir {folder} has no room for disk_cache_gib "
                              f"({num_blocks * geometry.block_bytes / 2**30:.2f} GiB): {exc.strerror}; free space "
                              f"there or lower --disk-cache-gib") from None
        # numpy has no bfloat16: map bytes and reinterpret them in torch.
        self._map = np.memmap(pool, dtype=np.uint8, mode="r+", shape=(num_blocks * geometry.block_bytes,))
        self.tensor = torch.from_numpy(self._map).view(geometry.dtype).view(num_blocks, *geometry.block_shape)
        self._journal_path = self.dir / "journal.bin"
        self._journal: int | None = None
        self._journal_lock = threading.Lock()
        self._live: dict[int, tuple[int, int]] = {}  # slot -> (hash, checksum) as the journal says, oldest first
        self._records = 0  # in the journal file
        self.blocks_written = 0
        self.bytes_written = 0

    def open(self, keep: bool = True) -> Opened:
        """Replay and check the journal, verify each slot's bytes, rewrite the journal compactly (keep=False:
        start empty)."""
        records: dict[int, tuple[int, int]] = {}  # slot -> (hash, checksum), in recency order (dict order)
        bad = 0
        data = self._journal_path.read_bytes() if keep and self._journal_path.exists() else b""
        for at in range(0, len(data) - _RECORD.size + 1, _RECORD.size):
            slot, kind, digest, crc, own = _RECORD.unpack_from(data, at)
            if zlib.crc32(data[at:at + _RECORD.size - 4]) != own or kind not in (_WRITE, _TOUCH):
                bad += 1
                continue
            if slot >= self.num_blocks:
                continue  # past this engine's bound (disk_cache_gib shrank)
            if kind == _WRITE:
                records.pop(slot, None)
                records[slot] = (digest, crc)
            elif slot in records and records[slot][0] == digest:
                records[slot] = records.pop(slot)
        bad += len(data) % _RECORD.size != 0  # a record cut short
        kept, corrupt, seen = [], 0, set()
        # Every block is read once: a bar where that takes a while (a full 4 GiB store, a few seconds).
        with tqdm(total=len(records) * self.block_bytes, desc="checking the disk cache", unit="B", unit_scale=True,
                  disable=len(records) * self.block_bytes < 2**28) as bar:
            for slot, (digest, crc) in reversed(records.items()):  # newest first: the newest copy of a hash wins
                bar.update(self.block_bytes)
                if digest in seen:
                    continue
                if checksum(self._slot(slot)) != crc:
                    corrupt += 1
                    continue
                kept.append((slot, digest, crc))
                seen.add(digest)
        kept.reverse()  # oldest first, as the tier's LRU takes them
        self._live = {slot: (digest, crc) for slot, digest, crc in kept}
        self._rewrite()
        if corrupt or bad:
            log.warning("disk cache %s: dropped %d block(s) that failed their checksum and %d damaged journal "
                        "record(s)", self.dir, corrupt, bad)
        return Opened([(slot, digest) for slot, digest, _ in kept], corrupt, bad)

    def _rewrite(self) -> None:
        """The journal as one write record per live slot, oldest first: written aside, then renamed over it."""
        tmp = self._journal_path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(_pack(slot, _WRITE, digest, crc) for slot, (digest, crc) in self._live.items()))
        os.replace(tmp, self._journal_path)
        if self._journal is not None:
            os.close(self._journal)
        self._journal = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND)
        self._records = len(self._live)

    def _slot(self, slot: int) -> memoryview:
        start = slot * self.block_bytes
        return memoryview(self._map[start:start + self.block_bytes])

    def written(self, blocks: list[tuple[int, int]]) -> None:
        """These (slot, hash) now hold their blocks' bytes: journal them with their checksums."""
        entries = [(slot, digest, checksum(self._slot(slot))) for slot, digest in blocks]
        self._append(b"".join(_pack(slot, _WRITE, digest, crc) for slot, digest, crc in entries), entries)
        self.blocks_written += len(blocks)
        self.bytes_written += len(blocks) * self.block_bytes

    def touched(self, blocks: list[tuple[int, int]]) -> None:
        """These (slot, hash) were read or hit on the device: they are the most recently used."""
        self._append(b"".join(_pack(slot, _TOUCH, digest, 0) for slot, digest in blocks),
                     [(slot, digest, None) for slot, digest in blocks])

    def _append(self, records: bytes, entries: list[tuple[int, int, int | None]]) -> None:
        """One write (O_APPEND: whole, whichever thread writes); a failed or short one ends the journal for this
        run, so the records after it cannot be misaligned: blocks not journaled are only missing at the next start.
        entries: (slot, hash, checksum, None for a touch), which the live state follows; once the journal holds
        a few times more records than live slots, it is rewritten from that state."""
        with self._journal_lock:  # the forward thread writes blocks, the engine's loop touches hits
            if self._journal is None:
                return
            for slot, digest, crc in entries:
                if crc is not None:
                    self._live.pop(slot, None)
                    self._live[slot] = (digest, crc)
                elif self._live.get(slot, (None,))[0] == digest:
                    self._live[slot] = self._live.pop(slot)
            self._records += len(entries)
            if self._records > 4 * len(self._live) + self.COMPACT_SLACK:
                try:
                    self._rewrite()
                    return
                except OSError as exc:
                    log.warning("disk cache %s: compacting the journal failed (%s)", self.dir, exc.strerror)
            try:
                done = os.write(self._journal, records)
            except OSError as exc:
                done, reason = -1, exc.strerror
            else:
                reason = f"{done} of {len(records)} bytes written"
            if done != len(records):
                log.warning("disk cache %s: the journal could not be written (%s); blocks cached from now on will "
                            "not outlive this engine", self.dir, reason)
                os.close(self._journal)
                self._journal = None

    def stats(self) -> dict:
        return {"disk_blocks_written": self.blocks_written, "disk_bytes_written": self.bytes_written}

    def close(self) -> None:
        """Close the files and let the folder go; the blocks stay for the next engine."""
        with self._journal_lock:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None
        self._map.flush()
        del self.tensor, self._map
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def describe(folder: str) -> list[dict]:
    """The stores in a disk_cache_dir: their settings, size, and blocks recorded (for `kvmux cache info`)."""
    out = []
    for meta_path in sorted(Path(folder).glob("**/meta.json")):  # tensor-parallel ranks' under rank-N/
        store = meta_path.parent
        meta = json.loads(meta_path.read_text())
        journal = store / "journal.bin"
        records = journal.stat().st_size // _RECORD.size if journal.exists() else 0
        pool = store / "pool.bin"
        out.append({"fingerprint": store.name, **meta, "journal_records": records,
                    "pool_bytes": pool.stat().st_size if pool.exists() else 0,
                    "disk_bytes": sum(f.stat().st_blocks * 512 for f in store.iterdir())})
    return out


def clear(folder: str) -> int:
    """Delete every store in a disk_cache_dir no engine uses; returns how many. StoreLocked if one does."""
    root = Path(folder)
    with open(root / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(f"disk_cache_dir {folder} is in use by a running kvmux engine; stop it first") from None
        stores = [p.parent for p in root.glob("**/meta.json")]
        for store in stores:
            shutil.rmtree(store)
    return len(stores)


def store_key(meta: dict) -> str:
    """The fingerprint of everything that shapes a KV block's bytes, as a folder name."""
    text = json.dumps({**meta, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()
