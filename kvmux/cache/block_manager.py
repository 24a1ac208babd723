"""Per-sequence block tables over the native block allocator.

A sequence's KV lives in fixed-size blocks of the pool; its block table maps
token position p to slot ``table[p // block_size] * block_size + p % block_size``.
Forked sequences share blocks by reference count, and a write into a shared
partially-filled block copies it first (copy-on-write).

Prefix caching: once a full block's KV has been computed (`mark_computed`,
after the forward that wrote it), it is registered in the allocator under a
chained content hash, and a new sequence whose prompt starts with the same
tokens shares it instead of computing it again. Only full blocks are ever
cached, and a full block is never written again, so a shared cached block is
read-only by construction. A request's cache salt enters the chain's root, so
requests of different salts never share a block (nor learn, by timing, that
another tenant's prompt was cached).

Tiers (kvmux/cache/tiers.py): cached blocks the device pool reclaims move down
to a host pool and then a disk pool instead of being dropped, and a prefix
lookup goes on down there; a preempted sequence can be swapped out to the host
pool (`swap_out`) and back (`swap_in`) with its block table rebuilt.

Sliding-window layers (Gemma 3's five of six) keep their KV in a pool of their own, for each sequence's window
only (`windows`, kvmux/cache/sliding_windows.py, with host and disk tiers of its own): every operation here on a
sequence's blocks does its part on its window too, and a prefix hit goes only as far as the window before its end
is cached there.

Nothing here moves bytes: every copy a decision implies -- copy-on-write,
swap, demotion, promotion -- joins one queue of `BlockCopy`s, in the order the
copies must run, which the runner takes (`take_copies`) and applies before the
next forward.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Sequence

from kvmux._native import BlockAllocator, BlockError, OutOfBlocks
from kvmux.cache.sliding_windows import SlidingWindows, Window
from kvmux.cache.tiers import DEVICE, DISK, BlockCopy, Tiers

__all__ = ["BlockManager", "BlockError", "OutOfBlocks", "block_hashes"]


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_hashes(parent: int, token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained 64-bit hashes of the full blocks of token_ids: h_i = H(h_{i-1}, tokens of block i).

    Chaining makes a block's hash stand for its whole prefix, so equal hashes
    mean equal KV. blake2b-64 makes an accidental collision negligible (about
    n^2 / 2^65 for n distinct blocks ever cached: 3e-8 for a million); we
    accept that rather than compare tokens on every hit. Inputs are not
    adversarial: prompts cannot be crafted to collide without breaking blake2b.
    """
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = array("q", token_ids[start:start + block_size]).tobytes()
        parent = _digest(parent.to_bytes(8, "little") + tokens)
        hashes.append(parent)
    return hashes


class _Seq:
    __slots__ = ("blocks", "num_tokens", "token_ids", "root", "hashes", "num_registered", "pending_end", "window")

    def __init__(self, blocks: list[int], num_tokens: int, token_ids: list[int], root: int,
                 hashes: list[int] | None = None, num_registered: int = 0, pending_end: int = 0,
                 window: Window | None = None):
        self.blocks = blocks
        self.window = window  # its slots in the sliding-window layers' pool, where there is one
        self.num_tokens = num_tokens
        self.token_ids = token_ids  # every token that has a slot, to hash blocks as they fill
        self.root = root  # parent hash of the first block: the engine's cache key and the request's salt
        self.hashes = hashes or []  # hashes of the leading full blocks, computed lazily
        self.num_registered = num_registered  # leading blocks already offered to the cache
        # Blocks [num_registered, pending_end) are prompt blocks this sequence
        # is still computing: counted in BlockManager._pending.
        self.pending_end = pending_end


class BlockManager:
    """Per-sequence block tables over the native allocator. Sequences are identified by a str id."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 cache_key: bytes = b"", num_host_blocks: int = 0, num_disk_blocks: int = 0,
                 num_sliding_blocks: int = 0, window: int = 0, num_host_sliding_blocks: int | None = None,
                 num_disk_sliding_blocks: int | None = None):
        """cache_key names whatever else shapes the KV (model, dtype): it seeds every hash chain.

        num_host_blocks / num_disk_blocks size the tiers below the device (0: none). num_sliding_blocks > 0: the
        sliding-window layers' pool, for a window of `window` tokens (the query's own included),
        num_host_sliding_blocks the host's, for swapped-out windows and cached slots (None: as many as the device's
        where there is a host tier), and num_disk_sliding_blocks the disk's (None: as many as its blocks).
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._root_hash = _digest(b"kvmux-kv\0" + cache_key)
        self._alloc = BlockAllocator(num_blocks)
        self._seqs: dict[str, _Seq] = {}
        self.prefix_query_tokens = 0  # prompt tokens looked up in the cache
        self.prefix_hit_tokens = 0  # of those, tokens whose KV was found there
        self.peak_used = 0  # the most device blocks in use at once since the last reset_peak
        # Hashes of prompt blocks some live sequence is computing right now -> how many.
        self._pending: Counter[int] = Counter()
        self._copies: list[BlockCopy] = []
        self.tiers = Tiers(self._alloc, num_host_blocks, num_disk_blocks, keep_prefixes=enable_prefix_caching,
                           copies=self._copies)
        self._swapped: dict[str, _Seq] = {}  # swapped-out sequences; their `blocks` are host blocks
        self.prefix_hit_blocks = [0, 0, 0]  # prefix cache hits found on the device, host, disk
        if num_host_sliding_blocks is None:
            num_host_sliding_blocks = num_sliding_blocks if num_host_blocks else 0
        if num_disk_sliding_blocks is None:
            num_disk_sliding_blocks = num_disk_blocks
        self.windows = SlidingWindows(num_sliding_blocks, block_size, window, num_host_sliding_blocks,
                                      num_disk_sliding_blocks, enable_prefix_caching,
                                      self._copies) if num_sliding_blocks else None

    def tiers_of(self, disk_tier: int) -> Tiers:
        """The stack of tiers a disk pool (DISK or DISK_SLIDING) belongs to."""
        return self.tiers if disk_tier == DISK else self.windows.tiers

    @property
    def num_free(self) -> int:
        return self._alloc.num_free

    @property
    def num_uncached_free(self) -> int:
        """Free blocks whose taking evicts no cached prefix."""
        return self._alloc.num_free - self._alloc.num_cached_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._alloc.num_free

    @property
    def window(self) -> int:
        """The sliding layers' window, where they have a pool of their own; else 0."""
        return self.windows.window if self.windows is not None else 0

    @property
    def num_sliding_blocks(self) -> int:
        return self.windows.pool.num_blocks if self.windows is not None else 0

    @property
    def num_sliding_used(self) -> int:
        """Sliding slots held by sequences (cached ones nobody holds are free)."""
        return self.windows.num_used if self.windows is not None else 0

    def blocks_for(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def root(self, salt: str | None) -> int:
        """The hash chain's root for a request of this cache salt (None: unsalted)."""
        if salt is None:
            return self._root_hash
        return _digest(self._root_hash.to_bytes(8, "little") + b"salt\0" + salt.encode("utf-8", "surrogatepass"))

    def _prompt_hashes(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """Hashes a new sequence may match: full blocks, but never the one holding the last token.

        That token is always computed (its logits give the first output), and
        computing it writes its block, which therefore must be the sequence's own.
        """
        if not self.enable_prefix_caching:
            return []
        cacheable = (len(token_ids) - 1) // self.block_size * self.block_size
        return block_hashes(self.root(salt), token_ids[:cacheable], self.block_size)

    def _lookup_hashes(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """The prompt's hashes a hit may use now."""
        return self._usable(self._prompt_hashes(token_ids, salt))

    def _usable(self, hashes: list[int]) -> list[int]:
        """All of them; with a sliding pool, as many as are cached in some tier and leave the window before the
        hit's end cached in the sliding pool."""
        if self.windows is None or not hashes:
            return hashes
        found = len(self._alloc.lookup(hashes))
        return hashes[:self.windows.usable_hits(hashes, found + self.tiers.available(hashes[found:]))]

    def can_allocate_prompt(self, token_ids: Sequence[int], reserve: int = 0, salt: str | None = None) -> bool:
        """Whether allocate(token_ids) fits, counting cache hits (free cached blocks revived still take room)."""
        cost = self._alloc.prefix_cost(self._lookup_hashes(token_ids, salt), self.blocks_for(len(token_ids)))
        return cost + reserve <= self._alloc.num_free

    def prefix_in_flight(self, token_ids: Sequence[int], salt: str | None = None) -> bool:
        """Whether the next block this prompt misses is being computed by another sequence right now.

        Admitting it now would compute that KV a second time; waiting a step
        or two for it to land in the cache is cheaper.
        """
        if not self._pending:
            return False
        hashes = self._prompt_hashes(token_ids, salt)
        hits = len(self._alloc.lookup(hashes))
        return hits < len(hashes) and hashes[hits] in self._pending

    def allocate(self, seq_id: str, token_ids: Sequence[int], salt: str | None = None) -> int:
        """Reserve slots for every token of a new sequence, sharing cached blocks of its prefix
        (only those cached under the same salt).

        Returns how many leading tokens already have their KV cached; the
        caller computes KV for the rest (always at least the last token).
        """
        if seq_id in self._seqs or seq_id in self._swapped:
            raise BlockError(f"sequence {seq_id!r} already exists")
        hashes = self._prompt_hashes(token_ids, salt)
        usable = self._usable(hashes)
        blocks, device_hits = self._alloc.allocate_with_prefix(usable, self.blocks_for(len(token_ids)))
        self._note_peak()
        # The run of cached blocks may go on below the device: promote it into the fresh blocks.
        self.tiers.touch_disk(hashes[:device_hits])
        from_host, from_disk = self.tiers.fetch(usable[device_hits:], blocks[device_hits:])
        hits = device_hits + from_host + from_disk
        self.prefix_hit_blocks[0] += device_hits
        self.prefix_hit_blocks[1] += from_host
        self.prefix_hit_blocks[2] += from_disk
        window = self.windows and self.windows.for_hit(hashes, hits, len(blocks))
        self._seqs[seq_id] = _Seq(blocks, len(token_ids), list(token_ids), self.root(salt), hashes,
                                  num_registered=hits, pending_end=len(hashes), window=window)
        self._pending.update(hashes[hits:])
        if self.enable_prefix_caching:
            self.prefix_query_tokens += len(token_ids)
            self.prefix_hit_tokens += hits * self.block_size
        return hits * self.block_size

    def mark_computed(self, seq_id: str, num_tokens: int) -> None:
        """The KV of the sequence's first num_tokens tokens is now in the pool: cache its full blocks.

        Called after the forward that wrote them, never before, so a lookup can
        only ever hit KV that really exists. A sequence freed meanwhile is skipped.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            return
        num_tokens = min(num_tokens, seq.num_tokens)
        full = num_tokens // self.block_size
        if self.enable_prefix_caching and full > seq.num_registered:
            self._hash_full_blocks(seq, full)
            for i in range(seq.num_registered, full):
                # False means another block already holds this content; this copy
                # simply stays private and returns to the plain free list.
                if self._alloc.register_block(seq.blocks[i], seq.hashes[i]):
                    self.tiers.persist(seq.blocks[i], seq.hashes[i])
                if seq.window is not None:
                    self.windows.register(seq.window, i, seq.hashes[i])
            self._end_pending(seq, full)
            seq.num_registered = full
        if seq.window is not None:
            self.windows.leave(seq.window, num_tokens)

    def sliding_table(self, seq_id: str, start: int, end: int) -> list[int]:
        """The sliding slot of each of the sequence's blocks (-1: none) for a chunk computing tokens start..end-1:
        blocks it writes get fresh slots; the window before `start` must hold its slots already."""
        return self.windows.table(self._get(seq_id).window, start, end, seq_id)

    def _hash_full_blocks(self, seq: _Seq, full: int) -> list[int]:
        """Hashes of the sequence's first `full` blocks, computing the missing ones."""
        if len(seq.hashes) < full:
            done = len(seq.hashes) * self.block_size
            parent = seq.hashes[-1] if seq.hashes else seq.root
            seq.hashes += block_hashes(parent, seq.token_ids[done:full * self.block_size], self.block_size)
        return seq.hashes[:full]

    def _end_pending(self, seq: _Seq, end: int) -> None:
        """Blocks below `end` are no longer being computed by seq (done, or the sequence is gone)."""
        for i in range(seq.num_registered, min(end, seq.pending_end)):
            self._pending[seq.hashes[i]] -= 1
            if self._pending[seq.hashes[i]] <= 0:
                del self._pending[seq.hashes[i]]

    def _cow_needed(self, seq: _Seq) -> bool:
        # Only a partially filled last block gets written into; a full one is
        # never touched again, so sharing it is safe.
        return seq.num_tokens % self.block_size != 0 and self._alloc.refcount(seq.blocks[-1]) > 1

    def blocks_needed_to_append(self, seq_id: str, n: int) -> int:
        seq = self._get(seq_id)
        if n <= 0:
            return 0
        grow = self.blocks_for(seq.num_tokens + n) - len(seq.blocks)
        return grow + self._cow_needed(seq)

    def append_slots(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """Grow a sequence by len(token_ids) slots; a shared, partly filled last block is copied first (queued)."""
        seq = self._get(seq_id)
        n = len(token_ids)
        if n == 0:
            return
        cow = self._cow_needed(seq)
        grow = self.blocks_for(seq.num_tokens + n) - len(seq.blocks)
        sliding_cow = seq.window is not None and self.windows.last_shared(seq.window, seq.num_tokens)
        # One all-or-nothing allocation covers both the copy and the growth, so
        # running out of blocks leaves the sequence untouched.
        fresh = self._alloc.allocate_n(grow + cow)
        self._note_peak()
        self.tiers.demote_reclaimed()
        if cow:
            src, dst = seq.blocks[-1], fresh.pop()
            self._alloc.decref(src)  # other owners still hold it
            seq.blocks[-1] = dst
            self._copies.append(BlockCopy(DEVICE, src, DEVICE, dst))
        if sliding_cow:
            self.windows.copy_last(seq.window)
        if seq.window is not None:
            self.windows.grow(seq.window, len(fresh))
        seq.blocks.extend(fresh)
        seq.num_tokens += n
        seq.token_ids.extend(token_ids)

    def reset_peak(self) -> None:
        """Start peak_used over from the blocks in use now (a benchmark's timed run)."""
        self.peak_used = self.num_used

    def _note_peak(self) -> None:
        self.peak_used = max(self.peak_used, self.num_used)

    def fill_tokens(self, seq_id: str, start: int, token_ids: Sequence[int]) -> None:
        """Name the tokens of slots appended before they were known (a step of several forwards samples them):
        their ids enter the blocks' hashes when mark_computed caches them, so they must be right by then."""
        seq = self._get(seq_id)
        end = start + len(token_ids)
        if start < len(seq.hashes) * self.block_size or end > seq.num_tokens:
            raise BlockError(f"sequence {seq_id!r}: slots {start}..{end} are not uncached slots of its "
                             f"{seq.num_tokens}")
        seq.token_ids[start:end] = token_ids

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Take back the slots past the first num_tokens: those of draft tokens verification rejected.

        Their blocks are the sequence's own (appended this step, never registered in the cache: mark_computed
        only ever covers accepted tokens), so blocks wholly past the end go straight back to the free list."""
        seq = self._get(seq_id)
        if not 0 <= num_tokens <= seq.num_tokens:
            raise BlockError(f"sequence {seq_id!r} has {seq.num_tokens} slots, cannot truncate to {num_tokens}")
        keep = self.blocks_for(num_tokens)
        if keep < seq.num_registered:
            raise BlockError(f"sequence {seq_id!r}: truncating to {num_tokens} tokens would cut cached blocks")
        self._alloc.free_blocks(seq.blocks[keep:][::-1])
        del seq.blocks[keep:]
        if seq.window is not None:
            self.windows.cut(seq.window, keep)
        del seq.token_ids[num_tokens:]
        del seq.hashes[num_tokens // self.block_size:]
        seq.num_tokens = num_tokens

    def fork(self, parent_id: str, child_id: str) -> None:
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise BlockError(f"sequence {child_id!r} already exists")
        self._alloc.fork(parent.blocks)
        self._seqs[child_id] = _Seq(list(parent.blocks), parent.num_tokens, list(parent.token_ids), parent.root,
                                    list(parent.hashes), parent.num_registered,
                                    window=parent.window and self.windows.fork(parent.window))

    def free(self, seq_id: str) -> None:
        # Last block first: cached blocks join the LRU in that order, so a
        # prefix's tail is evicted before its head, and the head, which every
        # longer prefix needs, stays reachable longest.
        seq = self._get(seq_id)
        self._alloc.free_blocks(seq.blocks[::-1])
        if seq.window is not None:
            self.windows.release(seq.window)
        self._end_pending(seq, seq.pending_end)
        del self._seqs[seq_id]

    # -- swapping ---------------------------------------------------------

    def swap_out(self, seq_id: str) -> bool:
        """Move a sequence's KV to the host pool and free its device blocks; False (nothing done) if the host is full.

        Only for a sequence whose every slot has been computed (a running one
        between steps): its full blocks are then hashed by content, so blocks
        it shares with others are stored on the host once. Its window goes to the host's sliding slots.
        """
        seq = self._get(seq_id)
        if seq.window is not None and not self.windows.fits_on_host(seq.window):
            return False
        hashes = self._hash_full_blocks(seq, seq.num_tokens // self.block_size)
        host_blocks = self.tiers.swap_out(seq.blocks, hashes)
        if host_blocks is None:
            return False
        window = seq.window and self.windows.swap_out(seq.window)
        self.free(seq_id)
        self._swapped[seq_id] = _Seq(host_blocks, seq.num_tokens, seq.token_ids, seq.root, hashes, window=window)
        return True

    def swap_in(self, seq_id: str) -> None:
        """Bring a swapped-out sequence back into device blocks (OutOfBlocks, nothing done, if they are lacking)."""
        seq = self._swapped[seq_id]
        if seq.window is not None:
            self.windows.check_room(seq.window)
        hashes = self._device_hashes(seq)
        # Blocks still cached on the device are shared as they are; the rest are copied back up.
        blocks, hits = self._alloc.acquire(hashes, len(seq.blocks) - len(hashes))
        self._note_peak()
        self.tiers.swap_in(seq.blocks, blocks, hits)
        window = seq.window and self.windows.swap_in(seq.window, hashes)
        del self._swapped[seq_id]
        self._seqs[seq_id] = _Seq(blocks, seq.num_tokens, seq.token_ids, seq.root, seq.hashes,
                                  num_registered=len(hashes), pending_end=len(hashes), window=window)

    def drop_swapped(self, seq_id: str) -> None:
        """Forget a swapped-out sequence (aborted): its host blocks return to the host pool."""
        seq = self._swapped.pop(seq_id)
        self.tiers.release(seq.blocks)
        if seq.window is not None:
            self.windows.drop(seq.window)

    def _device_hashes(self, seq: _Seq) -> list[int]:
        # Registered on the device only with prefix caching on, as computed blocks are.
        return seq.hashes if self.enable_prefix_caching else []

    def num_swapped_blocks(self, seq_id: str) -> int:
        return len(self._swapped[seq_id].blocks)

    def take_copies(self) -> list[BlockCopy]:
        """Block copies decided since the last call, in the order they must run (before the next forward)."""
        copies = list(self._copies)
        self._copies.clear()  # the list itself is shared with the tiers
        return copies

    def cache_stats(self) -> dict:
        queries, hits = self.prefix_query_tokens, self.prefix_hit_tokens
        device, host, disk = (n * self.block_size for n in self.prefix_hit_blocks)
        return {
            **self.tiers.stats(),
            "prefix_cache_hits_device": device, "prefix_cache_hits_host": host, "prefix_cache_hits_disk": disk,
            "prefix_cache_queries": queries,  # prompt tokens looked up
            "prefix_cache_hits": hits,  # of those, tokens served from the cache
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "cached_blocks": self._alloc.num_cached,
            "shared_blocks": self._alloc.num_shared,
            **(self.windows.stats() if self.windows is not None else {}),
        }

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._get(seq_id).blocks)

    def usage(self) -> dict[str, int]:
        """Blocks held by each live sequence (shared blocks count for every holder)."""
        return {seq_id: len(seq.blocks) for seq_id, seq in self._seqs.items()}

    def num_sliding_held(self, seq_id: str) -> int:
        """Sliding-window slots the sequence holds (0 without a sliding pool)."""
        window = self._get(seq_id).window
        return len(window.held()) if window is not None else 0

    def num_tokens(self, seq_id: str) -> int:
        return self._get(seq_id).num_tokens

    def kv_waste(self) -> float:
        """Fraction of slots in in-use blocks that hold no token (shared blocks counted once).

        Only a sequence's last block can be partly filled, and only where no holder has tokens past it: one
        step per sequence, with the block sets built by set.update, not a Python step per block (the bench
        samples this every 20 ms on the engine's event loop, where a slow one holds up the forward)."""
        bs = self.block_size
        held: set[int] = set()
        interior: set[int] = set()  # blocks some holder has filled past
        last_filled: dict[int, int] = {}
        for seq in self._seqs.values():
            blocks = seq.blocks
            if not blocks:
                continue
            held.update(blocks)
            interior.update(blocks[:-1])
            last = blocks[-1]
            last_filled[last] = max(last_filled.get(last, 0), min(bs, seq.num_tokens - (len(blocks) - 1) * bs))
        if not held:
            return 0.0
        empty = sum(bs - filled for block, filled in last_filled.items() if block not in interior)
        return empty / (len(held) * bs)

    def check_invariants(self) -> None:
        self._alloc.check_invariants()
        holders = Counter(b for seq in self._seqs.values() for b in seq.blocks)
        for seq_id, seq in self._seqs.items():
            if len(seq.blocks) != self.blocks_for(seq.num_tokens):
                raise RuntimeError(
                    f"sequence {seq_id!r}: {len(seq.blocks)} blocks for {seq.num_tokens} tokens"
                )
        for block in range(self.num_blocks):
            if self._alloc.refcount(block) != holders[block]:
                raise RuntimeError(
                    f"block {block} has refcount {self._alloc.refcount(block)} "
                    f"but {holders[block]} block table(s) hold it"
                )
        if self._alloc.num_free != self.num_blocks - len(holders):
            raise RuntimeError(
                f"{self._alloc.num_free} free blocks, expected "
                f"{self.num_blocks} - {len(holders)} in use"
            )
        for seq_id, seq in self._seqs.items():
            if len(seq.token_ids) != seq.num_tokens:
                raise RuntimeError(f"sequence {seq_id!r}: {len(seq.token_ids)} token ids for {seq.num_tokens} slots")
            # A cached block is read-only: it must be full wherever it is held.
            for i, block in enumerate(seq.blocks):
                if self._alloc.has_hash(block) and (i + 1) * self.block_size > seq.num_tokens:
                    raise RuntimeError(f"sequence {seq_id!r} can still write into cached block {block}")
        if self.windows is not None:
            self.windows.check({seq_id: (seq.window, len(seq.blocks)) for seq_id, seq in self._seqs.items()},
                               [seq.window for seq in self._swapped.values()])
        self.tiers.check_invariants(Counter(b for seq in self._swapped.values() for b in seq.blocks))
        pending = Counter(h for seq in self._seqs.values() for h in seq.hashes[seq.num_registered:seq.pending_end])
        if pending != self._pending:
            raise RuntimeError(f"in-flight prefix blocks {dict(self._pending)} != {dict(pending)} held by sequences")

    def _get(self, seq_id: str) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise BlockError(f"unknown sequence {seq_id!r}") from None
