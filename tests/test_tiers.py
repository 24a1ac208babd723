"""Tiers below the device pool: bookkeeping, copy order, and cached prefixes coming back from host and disk."""
import asyncio
import os
import random

import pytest
import torch

from kvmux import Engine
from kvmux._native import BlockAllocator, BlockError, OutOfBlocks
from kvmux.cache.block_manager import BlockManager
from kvmux.cache.tiers import DEVICE, DISK, HOST, BlockCopy, Tiers
from kvmux.cache.transfer import BlockCopier, _runs

from engine_helpers import assert_no_leaks, greedy

BS = 4


# -- native host-pool bookkeeping ---------------------------------------------

def test_acquire_shares_by_hash_and_registers_fresh_blocks():
    a = BlockAllocator(6)
    blocks, hits = a.acquire([11, 22], 1)
    assert hits == [False, False] and len(set(blocks)) == 3
    assert a.block_hash(blocks[0]) == 11 and not a.has_hash(blocks[2])
    again, hits = a.acquire([22, 33], 0)
    assert hits == [True, False] and again[0] == blocks[1] and a.refcount(blocks[1]) == 2
    assert a.acquire_cost([22, 33, 44], 2) == 3  # 22 and 33 are held: only 44 and the plain ones take room
    a.check_invariants()


def test_acquire_revives_cold_blocks_and_is_all_or_nothing():
    a = BlockAllocator(3)
    blocks, _ = a.acquire([1, 2], 0)
    a.free_blocks(blocks)
    assert a.num_free == 3 and a.num_cached_free == 2
    assert a.acquire_cost([1, 2], 1) == 3
    with pytest.raises(OutOfBlocks):
        a.acquire([1, 2, 3], 1)
    a.check_invariants()
    assert a.num_free == 3 and a.num_cached == 2  # untouched
    revived, hits = a.acquire([2], 0)
    assert hits == [True] and revived == [blocks[1]]
    a.check_invariants()


def test_eviction_log_names_reclaimed_cached_blocks():
    a = BlockAllocator(2)
    a.record_evictions = True
    blocks, _ = a.acquire([7, 8], 0)
    a.free_blocks(blocks[::-1])  # 8 first: it is the colder one
    assert a.take_evicted() == []
    taken = a.allocate_n(1)
    assert taken == [blocks[1]] and a.take_evicted() == [(blocks[1], 8)]
    assert a.take_evicted() == []
    a.check_invariants()


# -- the copy queue ----------------------------------------------------------

def test_runs_split_when_a_block_is_written_twice_or_read_after_a_write():
    copies = [BlockCopy(DEVICE, 1, HOST, 0), BlockCopy(DEVICE, 2, HOST, 1), BlockCopy(DEVICE, 3, HOST, 0),
              BlockCopy(HOST, 0, DISK, 0), BlockCopy(DEVICE, 4, DEVICE, 5), BlockCopy(DEVICE, 6, DEVICE, 7),
              BlockCopy(DEVICE, 5, DEVICE, 6)]
    assert list(_runs(copies)) == [((DEVICE, HOST), [1, 2], [0, 1]), ((DEVICE, HOST), [3], [0]),
                                   ((HOST, DISK), [0], [0]), ((DEVICE, DEVICE), [4, 6], [5, 7]),
                                   ((DEVICE, DEVICE), [5], [6])]


def test_copier_applies_copy_on_write_in_queue_order():
    pool = torch.arange(8.0).view(8, 1)
    BlockCopier([pool]).apply([BlockCopy(DEVICE, 1, DEVICE, 2), BlockCopy(DEVICE, 2, DEVICE, 3),
                                  BlockCopy(DEVICE, 0, DEVICE, 1)])
    assert pool.view(-1).tolist() == [0, 0, 1, 1, 4, 5, 6, 7]


def value(digest: int) -> float:
    return float(digest % 2**20)


def check_contents(bm: BlockManager, pools: list[torch.Tensor]) -> None:
    """Every cached block on every tier holds the contents of its hash."""
    for tier, alloc in enumerate((bm._alloc, bm.tiers.host, bm.tiers.disk)):
        for block in range(alloc.num_blocks):
            if alloc.has_hash(block):
                assert pools[tier][block].item() == value(alloc.block_hash(block)), (tier, block)


@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_keeps_every_tier_consistent(caching):
    """Sequences come and go, run and swap, over small pools; the simulated forward writes each
    full block's hash as its contents, the copier applies the queued copies like the runner."""
    rng = random.Random(0)
    bm = BlockManager(10, BS, enable_prefix_caching=caching, num_host_blocks=8, num_disk_blocks=6)
    pools = [torch.full((n, 1), -1.0) for n in (10, 8, 6)]
    copier = BlockCopier(pools)
    stems = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    live, swapped = [], []
    for step in range(300):
        action = rng.random()
        if action < 0.4:
            tokens = rng.choice(stems)[:rng.randrange(1, 12)] + [rng.randrange(50) for _ in range(rng.randrange(3))]
            if bm.can_allocate_prompt(tokens):
                sid = f"s{step}"
                bm.allocate(sid, tokens)
                live.append(sid)
        elif action < 0.55 and live:
            sid = live.pop(rng.randrange(len(live)))
            if bm.swap_out(sid):
                swapped.append(sid)
            else:
                bm.free(sid)
        elif action < 0.7 and swapped:
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
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
        # The forward: queued copies first, then the new KV of every live sequence.
        copier.apply(bm.take_copies())
        for sid in live:
            seq = bm._seqs[sid]
            hashes = bm._hash_full_blocks(seq, seq.num_tokens // BS)
            for block, digest in zip(seq.blocks, hashes):
                if pools[DEVICE][block].item() != value(digest):
                    assert not bm._alloc.has_hash(block), "a cached device block lost its contents"
                    pools[DEVICE][block] = value(digest)
            bm.mark_computed(sid, seq.num_tokens)
        copier.apply(bm.take_copies())  # the write-through to disk of what was just cached, as before the next forward
        for sid in swapped:  # a swapped sequence's full host blocks hold its contents
            seq = bm._swapped[sid]
            for block, digest in zip(seq.blocks, seq.hashes):
                assert pools[HOST][block].item() == value(digest)
        check_contents(bm, pools)
        bm.check_invariants()
    for sid in live:
        bm.free(sid)
    for sid in swapped:
        bm.drop_swapped(sid)
    bm.check_invariants()
    assert bm.num_free == 10 and bm.tiers.host.num_free == 8 and bm.tiers.disk.num_free == 6
    stats = bm.cache_stats()
    assert stats["blocks_swapped_out"] > 0 and stats["blocks_swapped_in"] > 0
    if caching:
        assert stats["prefix_blocks_to_host"] > 0 and stats["prefix_blocks_to_disk"] > 0
        assert stats["prefix_cache_hits_host"] > 0 and stats["prefix_cache_hits_disk"] > 0
    else:
        assert bm.tiers.host.num_cached == 0 and bm.tiers.disk.num_cached == 0


def test_demotion_chain_queues_the_deepest_copy_first():
    bm = BlockManager(2, BS, num_host_blocks=1, num_disk_blocks=1)
    for i, sid in enumerate("abc"):
        bm.allocate(sid, [i] * BS + [9])  # one full block, then the last token's own block
        bm.mark_computed(sid, BS + 1)
        bm.free(sid)
    # Each block is written through to the disk when cached; a's block went to the host when b's allocation
    # reclaimed it, and b's pushed it on to the disk: the host block's copy out is queued before b's copy in.
    copies = bm.take_copies()
    assert [(c.src_tier, c.dst_tier) for c in copies] == [(DEVICE, DISK), (DEVICE, HOST), (DEVICE, DISK),
                                                          (HOST, DISK), (DEVICE, HOST), (DEVICE, DISK)]
    assert bm.tiers.disk.num_cached == 1 and bm.tiers.host.num_cached == 1


# -- engine ---------------------------------------------------------------

def test_prefix_comes_back_from_disk_with_identical_outputs(tiny, tmp_path):
    rng = random.Random(3)
    prompt = [rng.randrange(3, 320) for _ in range(41)]  # 5 full blocks of 8
    flush = [[rng.randrange(3, 320) for _ in range(41)] for _ in range(6)]
    block_bytes = 2 * 2 * 2 * 8 * 16 * 4  # layers, K/V, kv heads, block size, head dim, float32
    options = dict(num_blocks=16, block_size=8, num_host_blocks=6, dtype="float32",
                   disk_cache_dir=str(tmp_path / "disk"), disk_cache_gib=64 * block_bytes / 2**30)

    async def main():
        async with Engine(tiny, **options) as engine:
            assert len(os.listdir(tmp_path / "disk")) == 2  # the lock, and this model's store
            first = await engine.complete(prompt, greedy(6))
            for other in flush:  # each pushes the earlier ones down: device -> host -> disk
                await engine.complete(other, greedy(6))
            before = await engine.stats()
            again = await engine.complete(prompt, greedy(6))
            stats = await engine.stats()
            assert_no_leaks(engine)
            assert engine.blocks.tiers.host.num_free == 6
        stores = [p for p in os.listdir(tmp_path / "disk") if p != "lock"]
        assert sorted(os.listdir(tmp_path / "disk" / stores[0])) == ["journal.bin", "meta.json", "pool.bin"]  # kept
        return first, again, before, stats

    first, again, before, stats = asyncio.run(main())
    assert again.token_ids == first.token_ids
    assert before["prefix_blocks_to_disk"] > 0 and stats["disk_blocks_total"] == 64
    assert stats["prefix_cache_hits_disk"] - before["prefix_cache_hits_disk"] == 5 * 8


def test_prefix_comes_back_from_host(tiny):
    rng = random.Random(4)
    prompt = [rng.randrange(3, 320) for _ in range(33)]
    other = [rng.randrange(3, 320) for _ in range(60)]

    async def main():
        async with Engine(tiny, num_blocks=12, block_size=8, num_host_blocks=32, dtype="float32") as engine:
            first = await engine.complete(prompt, greedy(6))
            # Takes 10 of the 12 blocks: the two coldest of prompt's 4 cached ones (its tail) go to the host.
            await engine.complete(other, greedy(20))
            again = await engine.complete(prompt, greedy(6))
            stats = await engine.stats()
            assert_no_leaks(engine)
        return first, again, stats

    first, again, stats = asyncio.run(main())
    assert again.token_ids == first.token_ids
    # One run of cached blocks: its head found on the device, its tail on the host.
    assert stats["prefix_cache_hits_device"] == 2 * 8 and stats["prefix_cache_hits_host"] == 2 * 8
    assert stats["prefix_blocks_to_host"] >= 2


def test_gather_refuses_before_it_takes_anything():
    """A window's slots gathered from the tiers: a hash no tier holds, or a device too full for the promotions,
    is refused with every tier as it was (nothing held on the host or the disk, nothing queued)."""
    copies: list[BlockCopy] = []
    device = BlockAllocator(2)
    tiers = Tiers(device, 2, 2, keep_prefixes=True, copies=copies)
    for tier, digest in ((tiers.host, 11), (tiers.disk, 12)):
        (block,), _ = tier.acquire([digest])
        tier.free_blocks([block])
    with pytest.raises(BlockError, match="no tier holds"):
        tiers.gather([11, 12, 13])
    held = device.allocate_n(1)
    with pytest.raises(OutOfBlocks):
        tiers.gather([11, 12])  # two promotions, one free device block
    assert not copies and tiers.host.num_free == 2 and tiers.disk.num_free == 2 and device.num_free == 1
    device.free_blocks(held)
    blocks, from_host, from_disk = tiers.gather([11, 12])
    assert (from_host, from_disk) == (1, 1)
    assert [(c.src_tier, c.dst_tier, c.dst) for c in copies] == [(HOST, DEVICE, blocks[0]), (DISK, DEVICE, blocks[1])]
    tiers.check_invariants({})
