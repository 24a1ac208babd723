"""Per-sequence block tables over the native block allocator.

A sequence's KV lives in fixed-size blocks of the pool; its block table maps
token position p to slot ``table[p // block_size] * block_size + p % block_size``.
Forked sequences share blocks by reference count, and a write into a shared
partially-filled block copies it first (copy-on-write).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from kvmux._native import BlockAllocator, BlockError, OutOfBlocks

__all__ = ["BlockManager", "BlockError", "OutOfBlocks"]


class _Seq:
    __slots__ = ("blocks", "num_tokens")

    def __init__(self, blocks: list[int], num_tokens: int):
        self.blocks = blocks
        self.num_tokens = num_tokens


class BlockManager:
    """Per-sequence block tables over the native allocator. Sequences are identified by a str id."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._alloc = BlockAllocator(num_blocks)
        self._seqs: dict[str, _Seq] = {}

    @property
    def num_free(self) -> int:
        return self._alloc.num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._alloc.num_free

    def blocks_for(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_for(num_tokens) + reserve <= self._alloc.num_free

    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> int:
        """Reserve slots for every token of a new sequence.

        Returns how many leading tokens already have their KV cached (always 0
        until prefix caching exists); the caller computes KV for the rest.
        """
        if seq_id in self._seqs:
            raise BlockError(f"sequence {seq_id!r} already exists")
        blocks = self._alloc.allocate_n(self.blocks_for(len(token_ids)))
        self._seqs[seq_id] = _Seq(blocks, len(token_ids))
        return 0

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

    def append_slots(self, seq_id: str, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Grow a sequence by len(token_ids) slots.

        Returns the (src_block, dst_block) copies the caller must apply to the
        KV pool before writing the new tokens.
        """
        seq = self._get(seq_id)
        n = len(token_ids)
        if n == 0:
            return []
        cow = self._cow_needed(seq)
        grow = self.blocks_for(seq.num_tokens + n) - len(seq.blocks)
        # One all-or-nothing allocation covers both the copy and the growth, so
        # running out of blocks leaves the sequence untouched.
        fresh = self._alloc.allocate_n(grow + cow)
        copies = []
        if cow:
            src, dst = seq.blocks[-1], fresh.pop()
            self._alloc.decref(src)  # other owners still hold it
            seq.blocks[-1] = dst
            copies.append((src, dst))
        seq.blocks.extend(fresh)
        seq.num_tokens += n
        return copies

    def fork(self, parent_id: str, child_id: str) -> None:
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise BlockError(f"sequence {child_id!r} already exists")
        self._alloc.fork(parent.blocks)
        self._seqs[child_id] = _Seq(list(parent.blocks), parent.num_tokens)

    def free(self, seq_id: str) -> None:
        self._alloc.free_blocks(self._get(seq_id).blocks)
        del self._seqs[seq_id]

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._get(seq_id).blocks)

    def num_tokens(self, seq_id: str) -> int:
        return self._get(seq_id).num_tokens

    def slot_mapping(self, seq_id: str, start: int, end: int) -> list[int]:
        """Pool slots of token positions [start, end)."""
        seq = self._get(seq_id)
        if not 0 <= start <= end <= seq.num_tokens:
            raise ValueError(
                f"positions [{start}, {end}) outside sequence {seq_id!r} of {seq.num_tokens} tokens"
            )
        bs = self.block_size
        slots: list[int] = []
        pos = start
        # One range per block instead of a divmod per token: prefill chunks
        # map thousands of positions at once.
        while pos < end:
            idx, off = divmod(pos, bs)
            take = min(bs - off, end - pos)
            base = seq.blocks[idx] * bs + off
            slots.extend(range(base, base + take))
            pos += take
        return slots

    def kv_waste(self) -> float:
        """Fraction of slots in in-use blocks that hold no token (shared blocks counted once)."""
        used_slots: dict[int, int] = {}
        bs = self.block_size
        for seq in self._seqs.values():
            for i, block in enumerate(seq.blocks):
                filled = min(bs, seq.num_tokens - i * bs)
                used_slots[block] = max(used_slots.get(block, 0), filled)
        if not used_slots:
            return 0.0
        allocated = len(used_slots) * bs
        return (allocated - sum(used_slots.values())) / allocated

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

    def _get(self, seq_id: str) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise BlockError(f"unknown sequence {seq_id!r}") from None
