"""The sliding-window layers' KV beside a sequence's blocks: a pool of slots of their own, held for the window only.

Sliding-window layers (Gemma 3's five of six) read only the last `window` tokens. The block manager keeps their KV
in a pool of its own (kvmux/cache/pool_plan.py sizes it) and, per sequence, a `Window`: beside each of its blocks
that some query to come still sees, a slot of that pool. A slot is taken when a chunk is about to write its block
(`table`) and given back once the window has moved past it (`leave`); it is registered under its block's hash, so
one leaving the window waits in the pool's LRU, and a prefix hit goes only as far as the window before its end is
still cached (`usable_hits`). Forks share slots by reference count, a fork's partly filled last block is copied (a
`BlockCopy` within SLIDING), a swapped-out sequence takes its window to the host's pool of slots (HOST_SLIDING) and
back.

The slots have tiers of their own below the device (`tiers`, kvmux/cache/tiers.py, over SLIDING, HOST_SLIDING and
DISK_SLIDING), keyed by the same hashes as the full-attention blocks': a cached slot the pool reclaims is demoted to
the host and then the disk, a slot cached on the device is written through to the disk, and a hit's window comes
back from wherever its slots are (`for_hit`). So a restart finds a prefix's window on the disk as it finds its
full-attention blocks.

Why the pool never runs out: a sequence holds at most its window's blocks and those its chunk writes, and every
holder of a window has a seat (Prefill counts each sample of a request, Decode each swapped-out sequence), for
which the pool was sized.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from kvmux._native import BlockAllocator, BlockError, OutOfBlocks
from kvmux.cache.tiers import SLIDING, SLIDING_TIERS, BlockCopy, Tiers


@dataclass
class Window:
    """A sequence's slots: per block, its slot (-1: none held); blocks below `lo` hold none, no query to come sees
    them."""

    slots: list[int]
    lo: int = 0

    def held(self) -> list[int]:
        return [slot for slot in self.slots if slot >= 0]


class SlidingWindows:
    def __init__(self, num_blocks: int, block_size: int, window: int, num_host_blocks: int, num_disk_blocks: int,
                 keep_prefixes: bool, copies: list[BlockCopy]) -> None:
        """window: the sliding layers' window in tokens (the query's own included); num_host_blocks: slots on the
        host, for swapped-out windows and cached slots; keep_prefixes: prefix caching is on; copies: the block
        manager's queue, which slot copies join."""
        if window <= 0:
            raise ValueError(f"a sliding pool needs a window > 0, got {window}")
        self.block_size, self.window = block_size, window
        self.pool = BlockAllocator(num_blocks)
        self.tiers = Tiers(self.pool, num_host_blocks, num_disk_blocks, keep_prefixes, copies, SLIDING_TIERS)
        self.host = self.tiers.host
        self.copies = copies
        self.hits_from = [0, 0]  # slots a prefix hit's window took back from the host, from the disk

    @property
    def num_used(self) -> int:
        """Slots held by sequences (cached ones nobody holds are free)."""
        return self.pool.num_blocks - self.pool.num_free

    def start(self, position: int) -> int:
        """The first block a sliding layer's query at `position` reads, and every later query too."""
        return max(0, position - self.window + 1) // self.block_size

    # -- a new sequence -----------------------------------------------------

    def usable_hits(self, hashes: list[int], found: int) -> int:
        """Of the `found` leading blocks a prefix lookup found cached, how many a hit may use: as many as leave the
        window before the hit's end cached in some tier here."""
        last_missing, last = [], -1  # per block: the last one up to it whose slot is not cached
        for i, digest in enumerate(hashes[:found]):
            if not self.tiers.holds(digest):
                last = i
            last_missing.append(last)
        hits = found
        while hits and last_missing[hits - 1] >= self.start(hits * self.block_size):
            hits -= 1
        return hits

    def for_hit(self, hashes: list[int], hits: int, num_blocks: int) -> Window:
        """The window of a sequence of num_blocks blocks whose first `hits` came from the prefix cache: the slots
        before its first token to compute, each cached in some tier (usable_hits made sure), brought back to the
        device where they are not on it."""
        lo = self.start(hits * self.block_size)
        cached, from_host, from_disk = self.tiers.gather(hashes[lo:hits])
        self.hits_from[0] += from_host
        self.hits_from[1] += from_disk
        return Window([-1] * lo + cached + [-1] * (num_blocks - hits), lo)

    # -- as the sequence runs -----------------------------------------------

    def table(self, w: Window, start: int, end: int, name: str) -> list[int]:
        """The slots for a chunk computing tokens start..end-1 (-1: none): blocks it writes get fresh ones; the
        window before `start` must hold its own already."""
        first, last = self.start(start), -(-end // self.block_size)
        missing = [i for i in range(first, last) if w.slots[i] < 0]
        if missing and missing[0] < start // self.block_size:
            raise BlockError(f"sequence {name!r}: block {missing[0]}, in the sliding window before token {start}, "
                             f"has no sliding slot")
        for i, slot in zip(missing, self.pool.allocate_n(len(missing))):
            w.slots[i] = slot
        self.tiers.demote_reclaimed()
        return list(w.slots)

    def register(self, w: Window, block: int, digest: int) -> None:
        """Block `block` is computed and cached under `digest`: its slot too, if it holds one."""
        if w.slots[block] >= 0 and self.pool.register_block(w.slots[block], digest):
            self.tiers.persist(w.slots[block], digest)

    def leave(self, w: Window, computed: int) -> None:
        """The sequence's first `computed` tokens have their KV: give back the slots no query to come sees."""
        lo = self.start(computed)
        if lo <= w.lo:
            return
        self.pool.free_blocks([slot for slot in w.slots[w.lo:lo] if slot >= 0][::-1])
        w.slots[w.lo:lo] = [-1] * (lo - w.lo)
        w.lo = lo

    def last_shared(self, w: Window, num_tokens: int) -> bool:
        """Whether writing the next token needs the partly filled last block's slot copied first (a fork shares it);
        OutOfBlocks when no slot is free for the copy, before the caller takes anything."""
        last = w.slots[-1] if w.slots else -1
        shared = last >= 0 and num_tokens % self.block_size != 0 and self.pool.refcount(last) > 1
        if shared and not self.pool.num_free:
            raise OutOfBlocks("no free sliding slot to copy a shared last block's into")
        return shared

    def copy_last(self, w: Window) -> None:
        """Give the window its own copy of its last block's slot (queued); last_shared said it is needed."""
        src = w.slots[-1]
        (dst,) = self.pool.allocate_n(1)
        self.tiers.demote_reclaimed()
        self.pool.decref(src)
        w.slots[-1] = dst
        self.copies.append(BlockCopy(SLIDING, src, SLIDING, dst))

    @staticmethod
    def grow(w: Window, num_blocks: int) -> None:
        w.slots.extend([-1] * num_blocks)  # slots come when a chunk writes them (table)

    def cut(self, w: Window, keep: int) -> None:
        """Drop the blocks from `keep` on (rejected drafts'): their slots are the sequence's own."""
        self.pool.free_blocks([slot for slot in w.slots[keep:] if slot >= 0][::-1])
        del w.slots[keep:]

    def fork(self, w: Window) -> Window:
        self.pool.fork(w.held())
        return Window(list(w.slots), w.lo)

    def release(self, w: Window) -> None:
        self.pool.free_blocks(w.held()[::-1])

    # -- swapping -----------------------------------------------------------

    def fits_on_host(self, w: Window) -> bool:
        return len(w.held()) <= self.host.num_free

    def swap_out(self, w: Window) -> Window:
        """The window copied to host slots (queued; fits_on_host first); the device's slots are the caller's to
        release."""
        held = [i for i, slot in enumerate(w.slots) if slot >= 0]
        out = Window([-1] * len(w.slots), w.lo)
        slots = self.host.allocate_n(len(held))
        self.tiers.demote_reclaimed_host()
        for i, slot in zip(held, slots):
            out.slots[i] = slot
            self.copies.append(BlockCopy(SLIDING, w.slots[i], self.tiers.ids.host, slot))
        self.tiers.blocks_swapped_out += len(held)
        return out

    def check_room(self, w: Window) -> None:
        """OutOfBlocks unless the pool has room for this swapped-out window (before the caller takes anything)."""
        if len(w.held()) > self.pool.num_free:
            raise OutOfBlocks(f"{len(w.held())} sliding slots needed, {self.pool.num_free} free")

    def swap_in(self, w: Window, hashes: list[int]) -> Window:
        """A swapped-out window back into fresh slots (queued copies; check_room first), the host's given back;
        those of full blocks (`hashes`) cached at once, as promoted blocks are: their copies run before any
        forward."""
        held = [i for i, slot in enumerate(w.slots) if slot >= 0]
        back = Window([-1] * len(w.slots), w.lo)
        slots = self.pool.allocate_n(len(held))
        self.tiers.demote_reclaimed()
        for i, slot in zip(held, slots):
            self.copies.append(BlockCopy(self.tiers.ids.host, w.slots[i], SLIDING, slot))
            back.slots[i] = slot
            if i < len(hashes):
                self.pool.register_block(slot, hashes[i])
        self.tiers.blocks_swapped_in += len(held)
        self.drop(w)
        return back

    def drop(self, w: Window) -> None:
        """Forget a swapped-out window: its host slots are free again."""
        self.host.free_blocks(w.held())

    # -- books --------------------------------------------------------------

    def stats(self) -> dict:
        return {"sliding_blocks_used": self.num_used, "sliding_blocks_cached": self.pool.num_cached,
                "sliding_slots_from_host": self.hits_from[0], "sliding_slots_from_disk": self.hits_from[1],
                **{f"sliding_{key}": value for key, value in self.tiers.stats().items()
                   if not key.startswith("blocks_swap_")}}

    def check(self, device: dict[str, tuple[Window, int]], host: list[Window]) -> None:
        """device: each live sequence's window and block count; host: the swapped-out sequences' windows."""
        self.pool.check_invariants()
        for name, (w, num_blocks) in device.items():
            if len(w.slots) != num_blocks:
                raise RuntimeError(f"sequence {name!r}: {len(w.slots)} sliding entries for {num_blocks} blocks")
            if any(slot >= 0 for slot in w.slots[:w.lo]):
                raise RuntimeError(f"sequence {name!r} holds sliding slots below its window")
        holders = Counter(slot for w, _ in device.values() for slot in w.held())
        for slot in range(self.pool.num_blocks):
            if self.pool.refcount(slot) != holders[slot]:
                raise RuntimeError(f"sliding slot {slot} has refcount {self.pool.refcount(slot)} "
                                   f"but {holders[slot]} sequence(s) hold it")
        self.tiers.check_invariants(Counter(slot for w in host for slot in w.held()))
