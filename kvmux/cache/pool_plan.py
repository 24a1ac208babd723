"""How the KV memory budget becomes pools: one pool of blocks for every layer or, for a model with sliding-window
layers, one for its full-attention layers and one for its sliding ones.

A sliding-window layer (five of Gemma 3's six) reads only the last `window` tokens, so a running sequence needs its
KV for the window, not for the whole context. Their pool is sized for the windows of every seat (--max-num-seqs)
plus one step's tokens, which the block manager never exceeds: a sequence holds at most the window's blocks and
those its chunk writes, and a swapped-out sequence and each sample of a request keep a seat of their own (Decode,
Prefill). What is left of the budget holds full-attention blocks, a fraction of a whole-model block's bytes. Where
that leaves fewer tokens than one pool of whole-model blocks would hold (many seats, a small budget), one pool it
is. `num_blocks` given: that many full-attention blocks, and the sliding pool beside them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from kvmux.cache.kv_cache import PoolGeometry


@dataclass(frozen=True)
class PoolPlan:
    geometry: PoolGeometry  # a block of the full-attention layers (of every layer, without a sliding pool)
    num_blocks: int
    sliding_geometry: PoolGeometry | None = None  # a slot of the sliding-window layers
    num_sliding_blocks: int = 0
    window: int = 0  # the sliding layers' window, in tokens (the query's own included); 0: no sliding pool

    def bytes_by_layer_group(self, used_blocks: int, used_sliding: int) -> dict[str, int]:
        """KV bytes held for these blocks and sliding slots in use: stats() keys, per pool's layers."""
        held = used_blocks * self.geometry.block_bytes
        if self.sliding_geometry is None:
            return {"kv_bytes_all_layers": held}
        return {"kv_bytes_full_attention": held,
                "kv_bytes_sliding_attention": used_sliding * self.sliding_geometry.block_bytes}


def plan_pool(geometry: PoolGeometry, *, budget_bytes: int, num_blocks: int | None, max_num_seqs: int,
              max_model_len: int, num_sliding_layers: int = 0, window: int = 0, step_tokens: int = 0,
              lookahead: int = 0) -> PoolPlan:
    """geometry: a block of every layer. num_blocks: the full-attention pool's size, overriding the budget.

    num_sliding_layers of the model's layers attend over a window of `window` tokens; step_tokens: the most tokens
    one step computes; lookahead: the most tokens a sequence's decode step adds after its first (drafts, or the
    later forwards of a step of several). Without sliding layers, or with a
    window no shorter than max_model_len, one pool holds every layer.
    """
    bs = geometry.block_size
    usable = max_num_seqs * -(-max_model_len // bs)  # every seat holding a full-length sequence
    full_length = num_blocks
    if full_length is None:
        full_length = min(budget_bytes // geometry.block_bytes, usable)
        if full_length < 1:
            raise ValueError(f"is smaller than one KV block ({geometry.block_bytes} bytes)")
    if not num_sliding_layers or not 0 < window < max_model_len:
        return PoolPlan(geometry, full_length)
    full = replace(geometry, num_layers=geometry.num_layers - num_sliding_layers)
    sliding = replace(geometry, num_layers=num_sliding_layers)
    per_seat = -(-(window - 1) // bs) + 2 + -(-(1 + lookahead) // bs)  # the window, its chunk, partial blocks
    need = max_num_seqs * per_seat + -(-step_tokens // bs)
    if num_blocks is not None:
        return PoolPlan(full, num_blocks, sliding, need, window)
    num_full = min((budget_bytes - need * sliding.block_bytes) // full.block_bytes, usable)
    if num_full < full_length:  # the seats' windows cost more than they save: one pool
        return PoolPlan(geometry, full_length)
    return PoolPlan(full, num_full, sliding, need, window)


def host_blocks(pool: PoolPlan, host_bytes: int, num_host_blocks: int | None = None) -> tuple[int, int]:
    """The host pool's full-attention blocks and sliding slots. `host_bytes` (--host-cache-gib) holds both: first as
    many slots as the device has (every window a swap may take), where they fit (else none, and a sequence holding
    a window is recomputed rather than swapped), then blocks. num_host_blocks given: that many blocks, and the
    slots beside them if it is not 0."""
    slots = pool.num_sliding_blocks
    if num_host_blocks is not None:
        return num_host_blocks, slots if num_host_blocks else 0
    slot_bytes = pool.sliding_geometry.block_bytes if slots else 0
    if slots * slot_bytes > host_bytes:
        slots = 0
    return (host_bytes - slots * slot_bytes) // pool.geometry.block_bytes, slots
