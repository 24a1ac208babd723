"""Moving KV blocks within and between tiers: the device pool, a host pool and a disk pool (and, for a model with
sliding-window layers, the same three for their slots).

Each tier is a tensor `[blocks, *PoolGeometry.block_shape]`, so a block is one
contiguous region and moving it is one copy. The host pool is pinned when the
device is CUDA; the disk pool is a memory-mapped file that outlives the
process (kvmux/cache/disk_store.py), whose journal the copier keeps: each
block written there is recorded with its checksum once its bytes are in the
file, each block read is recorded as recently used.

A copier applies the block manager's queue of copies (copy-on-write, swaps,
demotions, promotions; kvmux/cache/tiers.py) on the forward thread, in order,
before the forward:

- `BlockCopier` does plain torch copies. On CPU that is all there is to it:
  the forward starts after the copies, so all copy time is waiting time.
- `CudaBlockCopier` issues them on a dedicated CuPy stream (async copies from
  and to pinned memory), records an event after each batch, and makes the
  forward's stream wait only on the events of the device blocks that forward
  touches; copies of other blocks overlap the forward.
"""
from __future__ import annotations

import logging
import time

import torch

from kvmux.cache.disk_store import DiskStore
from kvmux.cache.kv_cache import PoolGeometry
from kvmux.cache.tiers import DEVICE, DISK, DISKS, BlockCopy

log = logging.getLogger("kvmux")


def host_pool(geometry: PoolGeometry, num_blocks: int, pinned: bool) -> torch.Tensor:
    """Uninitialised (a block is read only after a copy wrote it); pinned for async copies from a GPU."""
    return torch.empty((num_blocks, *geometry.block_shape), dtype=geometry.dtype, pin_memory=pinned)


def _runs(copies: list[BlockCopy]):
    """Consecutive copies between the same two tiers, batched. A batch reads all its sources before it writes,
    so a copy out of a block written earlier in the batch, or into one written already, starts a new one."""
    run_key, src, dst = None, [], []
    for src_tier, s, dst_tier, d, _ in copies:
        if (src_tier, dst_tier) != run_key or d in dst or (src_tier == dst_tier and s in dst):
            if src:
                yield run_key, src, dst
            run_key, src, dst = (src_tier, dst_tier), [], []
        src.append(s)
        dst.append(d)
    if src:
        yield run_key, src, dst


class BlockCopier:
    # Copy bandwidth assumed until one is measured (bytes/s): a conservative memcpy.
    PRIOR_BYTES_PER_S = 4e9

    def __init__(self, pools: list[torch.Tensor | None], disks: dict[int, DiskStore] | None = None) -> None:
        """pools[tier]: the device pool, the host pool, the disk pool, the sliding-window pools (None where that
        tier is absent); disks: the stores whose tensors the disk pools are, by tier (DISK, DISK_SLIDING)."""
        self.pools = pools
        self.disks = disks or {}
        self.bytes_moved = 0
        self.copy_seconds = 0.0  # time spent copying
        self.wait_seconds = 0.0  # of that, time the forward waited for it

    def apply(self, copies: list[BlockCopy]) -> None:
        if not copies:
            return
        started = time.perf_counter()
        for (src_tier, dst_tier), src, dst in _runs(copies):
            source, target = self.pools[src_tier], self.pools[dst_tier]
            rows = source[torch.tensor(src, device=source.device)]
            target[torch.tensor(dst, device=target.device)] = rows.to(target.device)
        self._journal(copies)
        elapsed = time.perf_counter() - started
        self.bytes_moved += sum(self._block_bytes(c.src_tier) for c in copies)
        self.copy_seconds += elapsed
        self.wait_seconds += elapsed

    def _block_bytes(self, tier: int) -> int:
        """A block's bytes in that tier's pool (the sliding-window pool's differ from the others')."""
        pool = self.pools[tier]
        return pool.stride(0) * pool.element_size()

    def _journal(self, copies: list[BlockCopy]) -> None:
        """Record the disk blocks these copies (all done) wrote and read."""
        for tier, disk in self.disks.items():
            written = [(c.dst, c.digest) for c in copies if c.dst_tier == tier]
            if written:
                disk.written(written)
            read = [(c.src, c.digest) for c in copies if c.src_tier == tier]
            if read:
                disk.touched(read)

    def before_forward(self, blocks: set[int]) -> None:
        """The forward is about to read or write these device blocks."""

    def after_forward(self) -> None:
        """The forward has been issued."""

    def bytes_per_s(self) -> float:
        measured = self.bytes_moved / self.copy_seconds if self.copy_seconds > 0 and self.bytes_moved > 2**20 else 0
        return measured or self.PRIOR_BYTES_PER_S

    def stats(self) -> dict:
        return {"block_copy_bytes": self.bytes_moved, "block_copy_seconds": self.copy_seconds,
                "block_copy_wait_seconds": self.wait_seconds,
                **{f"{'' if tier == DISK else 'sliding_'}{key}": value
                   for tier, disk in self.disks.items() for key, value in disk.stats().items()}}


class CudaBlockCopier(BlockCopier):
    """Copies on a dedicated CuPy stream, ordered against the forward by events.

    The copies of one step run in queue order on one stream, after the
    previous forward (they may read blocks it wrote). A forward waits only on
    the last event of each device block it touches. Disk copies go through
    pageable memory touched by the CPU, so they drain the stream first and
    run synchronously. block_copy_wait_seconds is the time the forward's
    stream stalled on copy events (measured with events around the waits), so
    1 - block_copy_wait_seconds / block_copy_seconds is the share of copy time
    hidden behind compute.
    """

    PRIOR_BYTES_PER_S = 2e10  # pinned PCIe 4 transfers
    _MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)

    def __init__(self, pools: list[torch.Tensor | None], disks: dict[int, DiskStore] | None = None) -> None:
        import cupy  # only ever imported when the device is CUDA

        super().__init__(pools, disks)
        self.cp = cupy
        self.device = pools[DEVICE].device
        with cupy.cuda.Device(self.device.index or 0):
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.forward_done = None  # event after the last forward
        self.pending: dict[int, object] = {}  # device block -> event of the last copy touching it
        self.timings: list[tuple[str, object, object]] = []  # (copy | wait, start event, end event)

    def _compute_stream(self):
        return self.cp.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)

    def _ptr(self, tier: int, block: int) -> int:
        return self.pools[tier].data_ptr() + block * self._block_bytes(tier)

    def apply(self, copies: list[BlockCopy]) -> None:
        if not copies:
            return
        cp = self.cp
        with cp.cuda.Device(self.device.index or 0):
            if self.forward_done is not None:
                self.stream.wait_event(self.forward_done)
            start = cp.cuda.Event()
            start.record(self.stream)
            for src_tier, src, dst_tier, dst, _ in copies:
                on_disk = src_tier in DISKS or dst_tier in DISKS
                if on_disk:
                    self.stream.synchronize()
                if DEVICE in (src_tier, dst_tier):
                    cp.cuda.runtime.memcpyAsync(self._ptr(dst_tier, dst), self._ptr(src_tier, src),
                                                self._block_bytes(src_tier), self._MEMCPY_DEFAULT, self.stream.ptr)
                else:  # host <-> disk in CPU memory; or within the sliding pool, on the forward's stream, in its order
                    self.pools[dst_tier][dst].copy_(self.pools[src_tier][src])
                if on_disk:
                    self.stream.synchronize()
            end = cp.cuda.Event()
            end.record(self.stream)
        self._journal(copies)  # disk copies ran synchronously
        for src_tier, src, dst_tier, dst, _ in copies:
            for tier, block in ((src_tier, src), (dst_tier, dst)):
                if tier == DEVICE:
                    self.pending[block] = end
        self.timings.append(("copy", start, end))
        self.bytes_moved += sum(self._block_bytes(c.src_tier) for c in copies)
        self._collect()

    def before_forward(self, blocks: set[int]) -> None:
        self.pending = {b: e for b, e in self.pending.items() if not e.done}
        waits = {id(e): e for b in blocks if (e := self.pending.get(b)) is not None}
        if not waits:
            return
        with self.cp.cuda.Device(self.device.index or 0):
            compute = self._compute_stream()
            before, after = self.cp.cuda.Event(), self.cp.cuda.Event()
            before.record(compute)
            for event in waits.values():
                compute.wait_event(event)
            after.record(compute)
        self.timings.append(("wait", before, after))

    def after_forward(self) -> None:
        with self.cp.cuda.Device(self.device.index or 0):
            done = self.cp.cuda.Event(disable_timing=True)
            done.record(self._compute_stream())
        self.forward_done = done
        self._collect()

    def _collect(self) -> None:
        """Add up the timings whose events have completed; keep the rest for later."""
        left = []
        for kind, start, end in self.timings:
            if not end.done:
                left.append((kind, start, end))
                continue
            seconds = self.cp.cuda.get_elapsed_time(start, end) / 1000
            if kind == "copy":
                self.copy_seconds += seconds
            else:
                self.wait_seconds += seconds
        self.timings = left


def make_copier(pools: list[torch.Tensor | None], disks: dict[int, DiskStore] | None = None) -> BlockCopier:
    if pools[DEVICE].is_cuda:
        try:
            return CudaBlockCopier(pools, disks)
        except ImportError:
            log.warning("CuPy is not installed: block copies run synchronously on the forward's stream")
    return BlockCopier(pools, disks)
