"""The sliding-window layers' pool: slots held for the window only, prefix hits only where the window is cached,
copy-on-write and truncation, and how the budget is split (kvmux/cache/block_manager.py, cache/pool_plan.py)."""

from __future__ import annotations

import random

import pytest
import torch

from kvmux.cache.block_manager import BlockError, BlockManager, OutOfBlocks
from kvmux.cache.kv_cache import PoolGeometry
from kvmux.cache.pool_plan import host_blocks, plan_pool
from kvmux.cache.tiers import DISK_SLIDING, HOST_SLIDING, SLIDING
from kvmux.cache.transfer import BlockCopier

BS, WINDOW = 8, 10  # a query sees itself and the 9 tokens before it: at most 3 blocks of 8


def toks(n, start=100):
    return list(range(start, start + n))


def value(digest: int) -> float:
    return float(digest % 2**20)


def run_chunks(bm, seq_id, tokens, chunk):
    """Compute a prompt chunk by chunk, as the engine does: slots for the chunk, then the forward's mark."""
    done = 0
    while done < len(tokens):
        end = min(done + chunk, len(tokens))
        table = bm.sliding_table(seq_id, done, end)
        assert all(s >= 0 for s in table[max(0, done - WINDOW + 1) // BS:-(-end // BS)])
        bm.mark_computed(seq_id, end)
        bm.check_invariants()
        done = end


def test_a_long_sequence_holds_slots_for_its_window_only_and_gives_all_back():
    bm = BlockManager(64, BS, num_sliding_blocks=8, window=WINDOW)
    assert bm.allocate("a", toks(200)) == 0
    run_chunks(bm, "a", toks(200), chunk=16)
    # After 200 tokens the next query (at 200) sees 191..200: blocks 23 and 24 (24 being the one it writes).
    assert bm.num_sliding_used == 2 and bm.num_used == 25
    for n in range(200, 230):  # decodes
        bm.append_slots("a", [7])
        bm.sliding_table("a", n, n + 1)
        bm.mark_computed("a", n + 1)
        assert bm.num_sliding_used <= 3
    bm.check_invariants()
    bm.free("a")
    assert bm.num_sliding_used == 0 and bm.num_free == 64
    bm.check_invariants()


def test_a_prefix_hit_needs_the_window_before_it_in_the_sliding_pool():
    bm = BlockManager(64, BS, num_sliding_blocks=6, window=WINDOW)
    prompt = toks(41)
    bm.allocate("a", prompt)
    run_chunks(bm, "a", prompt, chunk=41)
    bm.free("a")
    # Every full block is cached in both pools: a second copy of the prompt hits all five.
    # The query at 40 sees 31..40: the cached slots of blocks 3 and 4 are taken back, the others stay free.
    assert bm.allocate("b", prompt) == 40 and bm.num_sliding_used == 2
    bm.check_invariants()
    bm.free("b")
    # Another sequence takes every sliding slot, evicting the cached ones: the full-attention blocks are still
    # cached, but without the window's sliding KV a hit would be wrong, so none is used.
    other = toks(41, start=900)
    bm.allocate("x", other)
    bm.sliding_table("x", 0, 41)
    bm.free("x")
    assert bm.allocate("c", prompt) == 0
    run_chunks(bm, "c", prompt, chunk=16)
    bm.free("c")
    bm.check_invariants()


def test_a_forks_partly_filled_block_is_copied_in_both_pools_and_drafts_give_theirs_back():
    bm = BlockManager(32, BS, num_sliding_blocks=16, window=WINDOW)
    bm.allocate("a", toks(12))
    run_chunks(bm, "a", toks(12), chunk=12)
    bm.fork("a", "b")
    bm.append_slots("b", [1])
    copies = bm.take_copies()
    assert [c.src_tier for c in copies] == [0, SLIDING] and copies[1].dst not in bm._seqs["a"].window.slots
    bm.sliding_table("b", 12, 13)
    bm.append_slots("a", [2, 3, 4, 5, 6, 7])  # a token and five drafts: into a third block
    assert bm.sliding_table("a", 12, 18)[2] >= 0
    used = bm.num_sliding_used
    bm.truncate("a", 14)  # two kept: the third block and its slot go back
    assert bm.num_sliding_used == used - 1
    bm.check_invariants()
    for s in ("a", "b"):
        bm.free(s)
    assert bm.num_sliding_used == 0
    bm.check_invariants()


def test_a_swapped_out_sequence_takes_its_window_to_the_host_and_back():
    bm = BlockManager(32, BS, num_host_blocks=32, num_sliding_blocks=8, window=WINDOW)
    bm.allocate("a", toks(30))
    run_chunks(bm, "a", toks(30), chunk=30)
    window = [(i, s) for i, s in enumerate(bm._seqs["a"].window.slots) if s >= 0]
    assert [i for i, _ in window] == [2, 3]  # the next query, at 30, sees 21..30
    bm.take_copies()
    assert bm.swap_out("a") and bm.num_sliding_used == 0
    out = [c for c in bm.take_copies() if c.src_tier == SLIDING]
    assert [(c.src, c.dst_tier) for c in out] == [(s, HOST_SLIDING) for _, s in window]
    bm.check_invariants()
    bm.swap_in("a")
    back = [c for c in bm.take_copies() if c.dst_tier == SLIDING]
    assert [c.src for c in back] == [c.dst for c in out]
    held = [(i, s) for i, s in enumerate(bm._seqs["a"].window.slots) if s >= 0]
    assert held == [(i, c.dst) for (i, _), c in zip(window, back)]
    bm.check_invariants()
    assert bm.swap_out("a")
    bm.drop_swapped("a")
    assert bm.num_sliding_used == 0 and bm.windows.host.num_free == 8
    bm.check_invariants()


def test_a_chunk_whose_window_lost_its_slots_is_refused_by_name():
    bm = BlockManager(32, BS, num_sliding_blocks=16, window=WINDOW)
    bm.allocate("a", toks(40))
    bm.sliding_table("a", 0, 16)
    bm.mark_computed("a", 16)
    with pytest.raises(BlockError, match="sliding window before token 32"):
        bm.sliding_table("a", 32, 40)  # tokens 16..31 were never computed


def gemma3_270m(dtype=torch.bfloat16) -> PoolGeometry:
    return PoolGeometry(num_layers=18, num_kv_heads=1, head_dim=256, block_size=16, dtype=dtype)


def test_the_budget_goes_to_the_full_attention_layers_beyond_the_windows():
    budget = 2**30
    kw = dict(budget_bytes=budget, num_blocks=None, max_num_seqs=64, max_model_len=32768, step_tokens=512)
    one = plan_pool(gemma3_270m(), **kw)
    split = plan_pool(gemma3_270m(), num_sliding_layers=15, window=512, **kw)
    assert one.sliding_geometry is None and split.geometry.num_layers == 3 and split.sliding_geometry.num_layers == 15
    assert split.num_sliding_blocks == 64 * (32 + 2 + 1) + 32  # each seat's window and chunk, one step's tokens
    used = split.num_blocks * split.geometry.block_bytes + split.num_sliding_blocks * split.sliding_geometry.block_bytes
    assert budget - split.geometry.block_bytes < used <= budget
    assert split.num_blocks > 2.5 * one.num_blocks  # tokens the pool holds at once
    # Where the windows of every seat cost more than they save (256 seats in 1 GiB), one pool it is.
    crowded = plan_pool(gemma3_270m(), num_sliding_layers=15, window=512, **{**kw, "max_num_seqs": 256})
    assert crowded == plan_pool(gemma3_270m(), **{**kw, "max_num_seqs": 256})
    # num_blocks given: that many full-attention blocks, and never fewer sliding slots than the seats need.
    given = plan_pool(gemma3_270m(), num_sliding_layers=15, window=512, **{**kw, "num_blocks": 100})
    assert (given.num_blocks, given.num_sliding_blocks) == (100, split.num_sliding_blocks)
    # No saving to make: no sliding layers, or a window as long as the context.
    assert plan_pool(gemma3_270m(), num_sliding_layers=15, window=32768, **kw).sliding_geometry is None
    with pytest.raises(ValueError, match="smaller than one KV block"):
        plan_pool(gemma3_270m(), **{**kw, "budget_bytes": 1000})


def test_an_append_the_sliding_pool_cannot_copy_for_changes_nothing():
    """A fork's partly filled last block needs a sliding copy too: with no slot free, append_slots fails before it
    takes any block, so the sequence and both pools are as they were."""
    bm = BlockManager(32, BS, num_sliding_blocks=2, window=WINDOW)
    bm.allocate("a", toks(12))
    bm.sliding_table("a", 0, 12)  # both slots
    bm.mark_computed("a", 12)
    bm.fork("a", "b")
    before = (bm.num_free, bm.num_sliding_used, bm.block_table("a"), list(bm._seqs["a"].window.slots))
    with pytest.raises(OutOfBlocks, match="sliding slot"):
        bm.append_slots("a", [1, 2, 3, 4, 5])  # into a third block, after copying the shared second one
    assert (bm.num_free, bm.num_sliding_used, bm.block_table("a"), list(bm._seqs["a"].window.slots)) == before
    assert not bm.take_copies()
    bm.check_invariants()


def test_the_host_budget_holds_the_swapped_windows_first():
    split = plan_pool(gemma3_270m(), budget_bytes=2**30, num_blocks=None, max_num_seqs=64, max_model_len=32768,
                      num_sliding_layers=15, window=512, step_tokens=512)
    slot, block = split.sliding_geometry.block_bytes, split.geometry.block_bytes
    blocks, slots = host_blocks(split, 2**30)
    assert slots == split.num_sliding_blocks and blocks == (2**30 - slots * slot) // block
    assert host_blocks(split, 100 * 2**20) == (100 * 2**20 // block, 0)  # no room for the windows: none
    assert host_blocks(split, 2**30, num_host_blocks=7) == (7, split.num_sliding_blocks)
    assert host_blocks(split, 2**30, num_host_blocks=0) == (0, 0)
    one = plan_pool(gemma3_270m(), budget_bytes=2**30, num_blocks=None, max_num_seqs=64, max_model_len=32768)
    assert host_blocks(one, 2**30) == (2**30 // one.geometry.block_bytes, 0)


def test_random_workload_keeps_every_sliding_tier_consistent():
    """Sequences sharing prefixes come and go, run, swap and hit the cache over a sliding pool too small to keep
    every cached slot: slots go down to the host and the disk and come back from either, in any mix. The simulated
    forward writes each full block's hash as its slot's contents, a copier applies the queued copies as the runner
    does; every cached slot in every tier must hold its hash's contents, and every window it is given too."""
    rng = random.Random(1)
    bm = BlockManager(40, BS, num_host_blocks=8, num_disk_blocks=8, num_sliding_blocks=12, window=WINDOW,
                      num_host_sliding_blocks=6, num_disk_sliding_blocks=6)
    pools = [torch.full((n, 1), -1.0) for n in (40, 8, 8, 12, 6, 6)]
    copier = BlockCopier(pools)
    tiers = bm.windows.tiers
    stems = [[rng.randrange(50) for _ in range(30)] for _ in range(4)]
    live, swapped = [], []

    def forward(sid):
        """Compute every slot of the sequence not computed yet, as one chunk."""
        seq = bm._seqs[sid]
        bm.sliding_table(sid, computed[sid], seq.num_tokens)
        copier.apply(bm.take_copies())
        hashes = bm._hash_full_blocks(seq, seq.num_tokens // BS)
        for i, slot in enumerate(seq.window.slots):
            if slot >= 0 and i < len(hashes) and pools[SLIDING][slot].item() != value(hashes[i]):
                assert i >= computed[sid] // BS, f"block {i}'s slot lost its contents"
                pools[SLIDING][slot] = value(hashes[i])
        bm.mark_computed(sid, seq.num_tokens)
        computed[sid] = seq.num_tokens
        copier.apply(bm.take_copies())  # the write-through to the disk

    computed: dict[str, int] = {}
    for step in range(400):
        action = rng.random()
        if action < 0.35 and len(live) < 3:
            tokens = rng.choice(stems)[:rng.randrange(10, 30)] + [rng.randrange(50)]
            sid = f"s{step}"
            if bm.can_allocate_prompt(tokens):
                computed[sid] = bm.allocate(sid, tokens)
                live.append(sid)
                forward(sid)
        elif action < 0.5 and live:
            sid = live.pop(rng.randrange(len(live)))
            if bm.swap_out(sid):
                swapped.append(sid)
            else:
                bm.free(sid)
        elif action < 0.65 and swapped:
            sid = swapped.pop(0)
            try:
                bm.swap_in(sid)
                live.append(sid)
            except OutOfBlocks:
                swapped.append(sid)
        elif action < 0.85 and live:
            sid = rng.choice(live)
            if bm.blocks_needed_to_append(sid, 1) <= bm.num_free:
                bm.append_slots(sid, [rng.randrange(50)])
                forward(sid)
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
        copier.apply(bm.take_copies())
        for tier, alloc in ((SLIDING, bm.windows.pool), (HOST_SLIDING, tiers.host), (DISK_SLIDING, tiers.disk)):
            for slot in range(alloc.num_blocks):
                if alloc.has_hash(slot):
                    assert pools[tier][slot].item() == value(alloc.block_hash(slot)), (step, tier, slot)
        for sid in swapped:
            seq = bm._swapped[sid]
            for i, slot in enumerate(seq.window.slots[:len(seq.hashes)]):
                assert slot < 0 or pools[HOST_SLIDING][slot].item() == value(seq.hashes[i])
        bm.check_invariants()
    for sid in live:
        bm.free(sid)
    for sid in swapped:
        bm.drop_swapped(sid)
    bm.check_invariants()
    stats = bm.cache_stats()
    assert stats["sliding_prefix_blocks_to_host"] > 0 and stats["sliding_prefix_blocks_to_disk"] > 0
    assert stats["sliding_slots_from_host"] > 0 and stats["sliding_slots_from_disk"] > 0
    assert stats["sliding_blocks_swapped_out"] > 0
    assert tiers.host.num_free == 6 and bm.num_sliding_used == 0
