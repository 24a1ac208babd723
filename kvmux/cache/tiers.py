"""The host and disk tiers below the device pool: their books, and the queue of copies between tiers.

Every tier is a pool of KV blocks of the same shape, kept by its own native
`BlockAllocator`. Blocks are content-addressed by the chained prefix hashes of
the block manager, and a hash may live on several tiers at once (a promoted
block stays cached below too, so evicting it again costs no copy):

- device -> host: a cached device block whose contents an allocation reclaims
  is *demoted* (copied to the host pool, cached there) instead of dropped; so
  is a cold host block to the disk pool. The disk drops its coldest.
- host/disk -> device: a prefix lookup that runs past the device's cached
  blocks goes on in the host, then the disk, and *promotes* what it finds.
- write-through: with a disk tier, a block the device registers in its cache
  is also copied to the disk at once (`persist`), where it outlives the
  process (kvmux/cache/disk_store.py), so a restart finds every cached prefix;
  demoting it later costs no copy.
- swap: a preempted sequence's blocks are copied to the host pool and held
  there. Full blocks are acquired by hash, so a block several sequences share
  is stored on the host once; the partly filled last block is private.

A model with sliding-window layers has two such stacks of tiers
(kvmux/cache/sliding_windows.py): the full-attention layers' blocks and the
sliding layers' slots, each with its own device, host and disk pools, and the
same hashes name a block's contents in both.

Nothing here moves bytes. Each decision appends a `BlockCopy` to the block
manager's one copy queue, in the order the copies must run: a copy out of a
reclaimed block is queued before anything that writes into it. The decode
step hands the queue to the runner, which applies it on the forward thread
before the forward (kvmux/cache/transfer.py). Until then no forward runs, so
no block is written before its old contents are copied out.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from kvmux._native import BlockAllocator, BlockError, OutOfBlocks

# The pools a BlockCopy names: the full-attention layers' (every layer's, without a sliding pool) and the sliding
# window layers' (block_manager.py), each on the device, the host and the disk.
DEVICE, HOST, DISK = 0, 1, 2
SLIDING, HOST_SLIDING, DISK_SLIDING = 3, 4, 5
DISKS = (DISK, DISK_SLIDING)


class TierIds(NamedTuple):
    """Which pools one stack of tiers copies between."""

    device: int
    host: int
    disk: int


FULL_TIERS = TierIds(DEVICE, HOST, DISK)
SLIDING_TIERS = TierIds(SLIDING, HOST_SLIDING, DISK_SLIDING)


class BlockCopy(NamedTuple):
    """Copy one block's KV across all layers of its pool: copy-on-write, a swap, a demotion, a promotion or a
    write-through."""

    src_tier: int
    src: int
    dst_tier: int
    dst: int
    digest: int = 0  # the block's hash, for copies to and from the disk: what its journal records


class Tiers:
    def __init__(self, device: BlockAllocator, num_host_blocks: int, num_disk_blocks: int,
                 keep_prefixes: bool, copies: list[BlockCopy], ids: TierIds = FULL_TIERS) -> None:
        """keep_prefixes: prefix caching is on, so cold cached blocks go down the tiers instead of away.
        copies: the queue every copy this decides is appended to; ids: the pools its copies name."""
        self.device = device
        self.ids = ids
        self.host = BlockAllocator(num_host_blocks)
        self.disk = BlockAllocator(num_disk_blocks)
        self.keep_prefixes = keep_prefixes
        device.record_evictions = keep_prefixes and num_host_blocks > 0
        self.host.record_evictions = keep_prefixes and num_disk_blocks > 0
        self.copies = copies
        self.blocks_swapped_out = 0  # copied device -> host for preempted sequences
        self.blocks_swapped_in = 0  # copied host -> device when they come back
        self.blocks_deduplicated = 0  # swapped out without a copy: the host already held that content
        self.demoted = [0, 0, 0]  # cached blocks copied down into each tier
        self.dropped = 0  # cached blocks forgotten because the tier below had no room (or no tier below)
        self.disk_restored = 0  # blocks a restart found on the disk
        self.disk_corrupt = 0  # of those, dropped: their bytes failed their checksum
        self.disk_bad_records = 0  # journal records dropped: cut short or failing their own check
        # Tells the disk's journal which (disk block, hash) were just used, so its recency outlives the engine too
        # (DiskStore.touched; None: the disk tier does not persist).
        self.on_disk_touch: Callable[[list[tuple[int, int]]], None] | None = None

    # -- the prefix tier ------------------------------------------------------

    def demote_reclaimed(self) -> None:
        """Demote the cached device blocks the last device allocation reclaimed. Call after every one."""
        for block, digest in self.device.take_evicted():
            self._demote(self.ids.device, block, digest)

    def demote_reclaimed_host(self) -> None:
        """Demote the cached host blocks the last host allocation reclaimed. Call after every one."""
        for block, digest in self.host.take_evicted():
            self._demote(self.ids.host, block, digest)

    def _demote(self, tier: int, block: int, digest: int) -> None:
        from_device = tier == self.ids.device
        lower, dst_tier = (self.host, self.ids.host) if from_device else (self.disk, self.ids.disk)
        if lower.acquire_cost([digest]) > lower.num_free:
            self.dropped += 1
            return
        (dst,), (already,) = lower.acquire([digest])
        if from_device:
            # Taking that host block may reclaim a colder one: its copy to disk
            # must be queued before ours overwrites it.
            self.demote_reclaimed_host()
        if not already:
            self.copies.append(BlockCopy(tier, block, dst_tier, dst, digest))
            self.demoted[HOST if from_device else DISK] += 1
        elif not from_device and self.on_disk_touch is not None:
            self.on_disk_touch([(dst, digest)])
        lower.free_blocks([dst])  # cached and unheld: the tier's LRU keeps it

    def persist(self, block: int, digest: int) -> None:
        """The device just cached this block: copy it to the disk too, unless the disk holds its hash already."""
        if not self.keep_prefixes or self.disk.num_blocks == 0:  # disk blocks are never held: all are free
            return
        (dst,), (already,) = self.disk.acquire([digest])  # may reclaim the disk's coldest block: it is lost
        if not already:
            self.copies.append(BlockCopy(self.ids.device, block, self.ids.disk, dst, digest))
            self.demoted[DISK] += 1
        elif self.on_disk_touch is not None:
            self.on_disk_touch([(dst, digest)])
        self.disk.free_blocks([dst])

    def touch_disk(self, hashes: list[int]) -> None:
        """A lookup hit these hashes on the device: where the disk holds them too, they are its most recently
        used (else a prefix hot on the device all day would be the disk's coldest, the first it drops)."""
        if self.on_disk_touch is None or not hashes:
            return
        held = self.disk.lookup(hashes)
        if held:
            blocks, _ = self.disk.acquire(hashes[:len(held)])
            self.disk.free_blocks(blocks)
            self.on_disk_touch(list(zip(blocks, hashes)))

    def restore_disk(self, blocks: list[tuple[int, int]], corrupt: int, bad_records: int = 0) -> None:
        """The disk's blocks from before this process, (slot, hash) least recently used first, into its books."""
        every = self.disk.allocate_n(self.disk.num_blocks)
        assert every == list(range(self.disk.num_blocks)), "a fresh allocator hands out its blocks in order"
        kept = set()
        for slot, digest in blocks:
            if self.disk.register_block(slot, digest):
                kept.add(slot)
        self.disk.free_blocks([slot for slot, _ in blocks if slot in kept])  # in this order: the LRU's
        self.disk.free_blocks([b for b in reversed(every) if b not in kept])
        self.disk_restored += len(kept)
        self.disk_corrupt += corrupt
        self.disk_bad_records += bad_records

    def available(self, hashes: list[int]) -> int:
        """How long a leading run of `hashes` the host, then the disk, hold (what fetch would promote)."""
        if not (self.keep_prefixes and hashes):
            return 0
        n_host = len(self.host.lookup(hashes))
        return n_host + len(self.disk.lookup(hashes[n_host:]))

    def holds(self, digest: int) -> bool:
        """Whether some tier has this hash's block: the device, or with prefix caching the host or the disk."""
        return bool(self.device.lookup([digest]) or self.keep_prefixes and (self.host.lookup([digest])
                                                                            or self.disk.lookup([digest])))

    def gather(self, hashes: list[int]) -> tuple[list[int], int, int]:
        """Device blocks for `hashes`, each of which some tier holds (`holds`), in any order of tiers: shared where
        the device caches it, else promoted from the host or the disk into a fresh block (queued, and registered at
        once, as fetch's are). Returns the blocks and how many came from the host and from the disk."""
        # Everything is checked before anything is taken, so a refusal leaves every tier as it was.
        sources: dict[int, tuple[int, BlockAllocator]] = {}  # hash -> (tier, allocator) it is promoted from
        for digest in hashes:
            if self.device.lookup([digest]):
                continue
            found = [(tier, alloc) for tier, alloc in ((self.ids.host, self.host), (self.ids.disk, self.disk))
                     if alloc.lookup([digest])]
            if not found:
                raise BlockError(f"no tier holds the block of hash {digest:#x}")
            sources[digest] = found[0]
        if self.device.acquire_cost(hashes) > self.device.num_free:
            raise OutOfBlocks(f"{self.device.acquire_cost(hashes)} blocks needed, {self.device.num_free} free")
        # Held while the device's reclaimed blocks are demoted, which must never take them.
        below = {digest: (tier, alloc.acquire([digest])[0][0]) for digest, (tier, alloc) in sources.items()}
        blocks, hits = self.device.acquire(hashes)
        self.touch_disk([digest for digest, hit in zip(hashes, hits) if hit])
        self.demote_reclaimed()
        for block, hit, digest in zip(blocks, hits, hashes):
            if not hit:
                tier, src = below[digest]
                self.copies.append(BlockCopy(tier, src, self.ids.device, block, digest))
        for tier, src in below.values():
            (self.host if tier == self.ids.host else self.disk).free_blocks([src])
        from_host = sum(tier == self.ids.host for tier, _ in below.values())
        return blocks, from_host, len(below) - from_host

    def fetch(self, hashes: list[int], fresh: list[int]) -> tuple[int, int]:
        """Fill fresh device blocks with the leading run of `hashes` found on the host, then on disk.

        `fresh[i]` is the device block just allocated for `hashes[i]` (a
        device cache miss). Demotes what the device allocation reclaimed. Returns how many
        came from the host and from the disk; those are registered on the
        device at once, since their copies run before any forward reads them.
        """
        if not (self.keep_prefixes and hashes):
            self.demote_reclaimed()
            return 0, 0
        n_host = len(self.host.lookup(hashes))
        n_disk = len(self.disk.lookup(hashes[n_host:]))
        # Hold them while the device's reclaimed blocks are demoted: that
        # takes host and disk blocks, and must never take these.
        held_host, _ = self.host.acquire(hashes[:n_host])
        held_disk, _ = self.disk.acquire(hashes[n_host:n_host + n_disk])
        self.demote_reclaimed()
        sources = [(self.ids.host, b) for b in held_host] + [(self.ids.disk, b) for b in held_disk]
        for (tier, src), dst, digest in zip(sources, fresh, hashes):
            self.copies.append(BlockCopy(tier, src, self.ids.device, dst, digest))
            self.device.register_block(dst, digest)
        self.host.free_blocks(held_host)
        self.disk.free_blocks(held_disk)
        return n_host, n_disk

    # -- swapping sequences ---------------------------------------------------

    def swap_out(self, device_blocks: list[int], hashes: list[int]) -> list[int] | None:
        """Host blocks holding a sequence's device blocks, copies queued; None when the host has no room.

        hashes are those of the leading full blocks (the rest are partly
        filled): content already on the host is shared, not copied again.
        """
        n_plain = len(device_blocks) - len(hashes)
        if self.host.acquire_cost(hashes, n_plain) > self.host.num_free:
            return None
        host_blocks, hits = self.host.acquire(hashes, n_plain)
        self.demote_reclaimed_host()
        for i, (src, dst) in enumerate(zip(device_blocks, host_blocks)):
            if i < len(hits) and hits[i]:
                self.blocks_deduplicated += 1
            else:
                self.copies.append(BlockCopy(self.ids.device, src, self.ids.host, dst))
                self.blocks_swapped_out += 1
        return host_blocks

    def swap_in(self, host_blocks: list[int], device_blocks: list[int], device_hits: list[bool]) -> None:
        """Queue the copies back into freshly acquired device blocks (the device's cache hits need none)
        and let go of the host blocks."""
        self.demote_reclaimed()
        for i, (src, dst) in enumerate(zip(host_blocks, device_blocks)):
            if not (i < len(device_hits) and device_hits[i]):
                self.copies.append(BlockCopy(self.ids.host, src, self.ids.device, dst))
                self.blocks_swapped_in += 1
        self.release(host_blocks)

    def release(self, host_blocks: list[int]) -> None:
        self.host.free_blocks(host_blocks[::-1])
        if not self.keep_prefixes:
            # Hashes only deduplicated the swap; without prefix caching nobody looks cold blocks up again.
            self.host.evict(self.host.num_cached_free)

    def stats(self) -> dict:
        return {
            "host_blocks_total": self.host.num_blocks, "host_blocks_used": self.host.num_blocks - self.host.num_free,
            "host_cached_blocks": self.host.num_cached,
            "disk_blocks_total": self.disk.num_blocks, "disk_blocks_used": self.disk.num_cached,
            "blocks_swapped_out": self.blocks_swapped_out, "blocks_swapped_in": self.blocks_swapped_in,
            "blocks_swap_deduplicated": self.blocks_deduplicated,
            "prefix_blocks_to_host": self.demoted[HOST], "prefix_blocks_to_disk": self.demoted[DISK],
            "prefix_blocks_dropped": self.dropped,
            "disk_blocks_restored": self.disk_restored, "disk_blocks_corrupt": self.disk_corrupt,
            "disk_journal_bad_records": self.disk_bad_records,
        }

    def check_invariants(self, host_holders: dict[int, int]) -> None:
        """host_holders: host block -> how many swapped sequences hold it. Disk blocks are never held."""
        self.host.check_invariants()
        self.disk.check_invariants()
        # A reclaimed cached block not demoted at once would be demoted later, after something overwrote it.
        for name, alloc in (("device", self.device), ("host", self.host)):
            if alloc.num_evicted:
                raise RuntimeError(f"{alloc.num_evicted} {name} block(s) reclaimed but never demoted: an allocation "
                                   f"was not followed by its demote_reclaimed")
        # The native checker has matched held blocks with the free count, so
        # checking the holders' blocks covers every held one.
        for block, holders in host_holders.items():
            if self.host.refcount(block) != holders:
                raise RuntimeError(f"host block {block} has refcount {self.host.refcount(block)} "
                                   f"but {holders} swapped sequence(s) hold it")
        if self.host.num_blocks - self.host.num_free != len(host_holders):
            raise RuntimeError(f"{self.host.num_blocks - self.host.num_free} host blocks held, "
                               f"{len(host_holders)} by swapped sequences")
        if self.disk.num_free != self.disk.num_blocks:
            raise RuntimeError(f"{self.disk.num_blocks - self.disk.num_free} disk blocks are held")
