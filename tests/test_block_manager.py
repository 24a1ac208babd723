import random

import pytest

from kvmux.cache.block_manager import BlockError, BlockManager, OutOfBlocks


def toks(n):
    return list(range(100, 100 + n))


def append(bm, seq_id, token_ids):
    """append_slots, returning the (src, dst) copy-on-write copies it queued."""
    bm.append_slots(seq_id, token_ids)
    return [(c.src, c.dst) for c in bm.take_copies()]


def snapshot(bm):
    return {
        "free": bm.num_free,
        "seqs": {s: (bm.block_table(s), bm.num_tokens(s)) for s in bm._seqs},
    }


def test_blocks_for_and_can_allocate_prompt():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert bm.can_allocate_prompt(toks(16))
    assert not bm.can_allocate_prompt(toks(17))
    assert bm.can_allocate_prompt(toks(8), reserve=2)
    assert not bm.can_allocate_prompt(toks(9), reserve=2)


def test_allocate_and_append_across_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", toks(3)) == 0
    assert bm.block_table("a") == [0]
    assert (bm.num_tokens("a"), bm.num_used, bm.num_free) == (3, 1, 7)
    assert append(bm, "a", toks(1)) == []  # fills block 0 exactly
    assert bm.block_table("a") == [0]
    assert append(bm, "a", toks(1)) == []  # spills into a new block
    assert bm.block_table("a") == [0, 1]
    assert append(bm, "a", toks(8)) == []  # 5 + 8 = 13 tokens -> 4 blocks
    assert bm.block_table("a") == [0, 1, 2, 3]
    assert bm.num_tokens("a") == 13
    assert append(bm, "a", []) == []
    assert bm.num_tokens("a") == 13 and bm.num_used == 4
    bm.check_invariants()


def test_fork_then_append_into_shared_partial_block_copies_it():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", toks(6))  # blocks 0, 1 (block 1 half full)
    bm.fork("p", "c")
    assert bm.block_table("c") == [0, 1] and bm.num_tokens("c") == 6
    assert bm.num_used == 2
    assert bm.blocks_needed_to_append("c", 1) == 1
    copies = append(bm, "c", toks(1))
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == 1 and dst not in (0, 1)
    assert bm.block_table("c") == [0, dst]
    assert bm.block_table("p") == [0, 1]
    assert (bm.num_tokens("p"), bm.num_tokens("c")) == (6, 7)
    # Block 1 now belongs to the parent alone: it appends in place.
    assert bm.blocks_needed_to_append("p", 1) == 0
    assert append(bm, "p", toks(1)) == []
    assert bm.block_table("p") == [0, 1]
    bm.check_invariants()


def test_cow_plus_growth_in_one_append():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", toks(2))
    bm.fork("p", "c")
    assert bm.blocks_needed_to_append("c", 7) == 3  # copy + 2 new blocks
    free = bm.num_free
    copies = append(bm, "c", toks(7))
    assert free - bm.num_free == 3
    assert [s for s, _ in copies] == [0]
    assert bm.block_table("c")[0] == copies[0][1]
    assert len(bm.block_table("c")) == 3 and bm.block_table("p") == [0]
    bm.check_invariants()


def test_append_into_shared_full_block_takes_new_block_without_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", toks(8))  # blocks 0, 1 both full
    bm.fork("p", "c")
    assert bm.blocks_needed_to_append("c", 1) == 1
    assert append(bm, "c", toks(1)) == []
    assert bm.block_table("c") == [0, 1, 2]
    assert bm.block_table("p") == [0, 1]
    assert bm._alloc.refcount(1) == 2
    bm.check_invariants()


def test_free_releases_shared_blocks_only_when_last_owner_goes():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", toks(5))
    bm.fork("p", "c")
    bm.free("p")
    assert not bm.has("p") and bm.has("c")
    assert bm.num_used == 2
    bm.free("c")
    assert bm.num_free == 8
    bm.check_invariants()


@pytest.mark.parametrize("seed", range(20))
def test_random_scenarios_free_everything(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=rng.choice([1, 2, 4, 16]))
    next_id = 0
    for _ in range(200):
        seqs = list(bm._seqs)
        op = rng.random()
        try:
            if op < 0.3 or not seqs:
                bm.allocate(f"s{next_id}", toks(rng.randrange(0, 20)))
                next_id += 1
            elif op < 0.65:
                sid = rng.choice(seqs)
                n = rng.randrange(0, 6)
                need = bm.blocks_needed_to_append(sid, n)
                free = bm.num_free
                copies = append(bm, sid, toks(n))
                assert free - bm.num_free == need
                assert len(copies) <= 1
            elif op < 0.8:
                bm.fork(rng.choice(seqs), f"s{next_id}")
                next_id += 1
            else:
                bm.free(rng.choice(seqs))
        except OutOfBlocks:
            pass
        bm.check_invariants()
    for sid in list(bm._seqs):
        bm.free(sid)
    assert bm.num_free == bm.num_blocks and bm.num_used == 0
    bm.check_invariants()


def test_kv_waste():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.kv_waste() == 0.0
    bm.allocate("a", toks(5))  # 2 blocks, 8 slots, 5 used
    assert bm.kv_waste() == pytest.approx(3 / 8)
    bm.allocate("b", toks(4))  # +1 full block: 12 slots, 9 used
    assert bm.kv_waste() == pytest.approx(3 / 12)
    bm.fork("a", "c")  # shared blocks count once
    assert bm.kv_waste() == pytest.approx(3 / 12)
    append(bm, "c", toks(1))  # copy of a's partial block: 16 slots, 9 + 2 used
    assert bm.kv_waste() == pytest.approx(5 / 16)
    for s in ("a", "b", "c"):
        bm.free(s)
    assert bm.kv_waste() == 0.0


def test_duplicate_seq_id_rejected_without_state_change():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(5))
    bm.allocate("b", toks(1))
    before = snapshot(bm)
    with pytest.raises(BlockError, match="'a' already exists"):
        bm.allocate("a", toks(3))
    with pytest.raises(BlockError, match="'b' already exists"):
        bm.fork("a", "b")
    assert snapshot(bm) == before
    bm.check_invariants()


def test_unknown_seq_rejected():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(5))
    before = snapshot(bm)
    for call in (
        lambda: append(bm, "zz", toks(1)),
        lambda: bm.blocks_needed_to_append("zz", 1),
        lambda: bm.fork("zz", "new"),
        lambda: bm.free("zz"),
        lambda: bm.block_table("zz"),
        lambda: bm.num_tokens("zz"),
    ):
        with pytest.raises(BlockError, match="unknown sequence 'zz'"):
            call()
    assert snapshot(bm) == before
    assert not bm.has("new")
    bm.check_invariants()


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", toks(6))  # 2 blocks
    bm.fork("a", "b")
    bm.allocate("c", toks(5))  # 2 blocks: pool full
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks, match="need 1, 0 free of 4"):
        bm.allocate("d", toks(1))
    with pytest.raises(OutOfBlocks):
        append(bm, "b", toks(1))  # needs a copy of the shared partial block
    with pytest.raises(OutOfBlocks):
        append(bm, "c", toks(4))  # needs growth
    assert snapshot(bm) == before
    assert not bm.has("d")
    bm.check_invariants()
    bm.free("c")
    # Copy and growth together need 2 blocks; with exactly 2 free it succeeds.
    assert bm.blocks_needed_to_append("b", 3) == 2
    assert len(append(bm, "b", toks(3))) == 1
    bm.check_invariants()


def test_check_invariants_detects_corrupt_tables():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(5))
    bm.allocate("b", toks(2))
    bm._seqs["b"].blocks.append(bm._seqs["a"].blocks[0])  # a reference nobody counted
    bm._seqs["b"].num_tokens = 6
    with pytest.raises(RuntimeError, match="refcount 1 but 2 block table"):
        bm.check_invariants()

    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(5))
    bm._seqs["a"].num_tokens = 9  # claims a third block it never got
    with pytest.raises(RuntimeError, match="2 blocks for 9 tokens"):
        bm.check_invariants()


# -- prefix caching ----------------------------------------------------------


def test_prefix_hits_only_after_kv_is_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = toks(10)  # blocks: [0..3] [4..7] partial [8, 9]
    assert bm.allocate("a", prompt) == 0
    assert bm.allocate("b", prompt) == 0  # a's KV is not computed yet: no hit
    bm.mark_computed("a", 10)
    assert bm.allocate("c", prompt) == 8  # both full blocks shared, the partial one is private
    assert bm.block_table("c")[:2] == bm.block_table("a")[:2]
    assert bm.block_table("c")[2] != bm.block_table("a")[2]
    assert bm.cache_stats()["shared_blocks"] == 2
    bm.check_invariants()


def test_a_hit_never_covers_the_last_prompt_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate("a", toks(8))
    bm.mark_computed("a", 8)
    # The whole prompt is cached, but its last token must be computed for logits,
    # and it writes into its block: that block cannot be a shared one.
    assert bm.allocate("b", toks(8)) == 4
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]
    assert bm.allocate("c", toks(9)) == 8  # one more token: both full blocks hit
    bm.check_invariants()


def test_cached_blocks_survive_free_and_are_revived():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", toks(9))
    bm.mark_computed("a", 9)
    table = bm.block_table("a")
    bm.free("a")
    assert bm.num_free == 4
    assert bm.cache_stats()["cached_blocks"] == 2
    assert bm.can_allocate_prompt(toks(16))  # 2 revived + 2 fresh = the whole pool
    assert bm.allocate("b", toks(16)) == 8
    assert bm.block_table("b")[:2] == table[:2]
    stats = bm.cache_stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (9 + 16, 8)
    bm.check_invariants()


def test_prefix_tail_is_evicted_before_its_head():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", toks(13))
    bm.mark_computed("a", 13)
    bm.free("a")  # 3 cached blocks + 1 plain free block
    bm.allocate("x", [1, 2])  # the plain free block
    bm.allocate("y", [3, 4])  # none left: the coldest cached block goes, a's last full one
    bm.free("x")
    bm.free("y")
    assert bm.allocate("b", toks(13)) == 8
    bm.check_invariants()


def test_decode_blocks_are_cached_as_they_fill():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(3))
    bm.mark_computed("a", 3)
    append(bm, "a", [103])
    append(bm, "a", [104])
    bm.mark_computed("a", 5)  # position 4 is still being written: only block 0 is complete
    assert bm.allocate("b", toks(5) + [7]) == 4
    bm.check_invariants()


def test_mark_computed_of_freed_sequence_is_ignored():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", toks(8))
    bm.free("a")
    bm.mark_computed("a", 8)
    assert bm.cache_stats()["cached_blocks"] == 0


def test_disabled_cache_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    bm.allocate("a", toks(9))
    bm.mark_computed("a", 9)
    assert bm.allocate("b", toks(9)) == 0
    assert bm.cache_stats()["cached_blocks"] == 0
    assert bm.cache_stats()["prefix_cache_queries"] == 0


def test_cache_key_separates_hash_chains():
    plain = BlockManager(num_blocks=4, block_size=4)
    other = BlockManager(num_blocks=4, block_size=4, cache_key=b"another-model|bfloat16")
    assert plain._lookup_hashes(toks(9)) != other._lookup_hashes(toks(9))


def test_a_salted_sequence_finds_none_of_another_salts_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = toks(13)  # three full blocks the cache may serve, then the last token's own block
    for seq_id, salt in (("u", None), ("a", "tenant-a")):
        bm.allocate(seq_id, prompt, salt=salt)
        bm.mark_computed(seq_id, 13)
        bm.free(seq_id)
    assert bm.cache_stats()["cached_blocks"] == 6  # the same tokens, cached twice: once per salt
    assert bm.can_allocate_prompt(prompt, salt="tenant-b")
    assert not bm.prefix_in_flight(prompt, salt="tenant-b")
    assert bm.allocate("b", prompt, salt="tenant-b") == 0  # neither the unsalted copy nor tenant-a's
    assert bm.allocate("a2", prompt, salt="tenant-a") == 12  # the same salt shares as before
    assert bm.allocate("u2", prompt) == 12
    assert set(bm.block_table("a2")[:3]).isdisjoint(bm.block_table("u2")[:3])
    # A fork and a sequence grown past its prompt keep hashing under their salt.
    bm.fork("a2", "a3")
    bm.append_slots("a3", toks(16)[13:])
    bm.mark_computed("a3", 16)
    bm.free("a3")
    assert bm.allocate("a4", toks(17), salt="tenant-a") == 16
    assert bm.allocate("u3", toks(17)) == 12
    for seq_id in ("b", "a2", "u2", "a4", "u3"):
        bm.free(seq_id)
    bm.check_invariants()


def test_fork_shares_cached_prompt_and_copies_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", toks(6))
    bm.mark_computed("p", 6)
    bm.fork("p", "c")
    assert bm.cache_stats()["shared_blocks"] == 2
    copies = append(bm, "c", [1])
    assert copies == [(bm.block_table("p")[1], bm.block_table("c")[1])]
    assert append(bm, "p", [2]) == []  # the parent is sole owner again
    bm.mark_computed("c", 7)
    bm.mark_computed("p", 7)
    bm.check_invariants()
    bm.free("p")
    bm.free("c")
    assert bm.num_free == 8
    bm.check_invariants()


def test_prefix_in_flight_until_computed_or_freed():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = toks(10)
    assert not bm.prefix_in_flight(prompt)
    bm.allocate("a", prompt)
    assert bm.prefix_in_flight(prompt)  # a is computing blocks another copy would want
    assert not bm.prefix_in_flight([1] + prompt)
    bm.mark_computed("a", 4)
    assert bm.prefix_in_flight(prompt)  # the second block is still on its way
    bm.check_invariants()
    bm.mark_computed("a", 10)
    assert not bm.prefix_in_flight(prompt)
    bm.allocate("b", toks(12))
    bm.free("b")  # gone before computing its third block
    assert not bm.prefix_in_flight(toks(13))
    bm.check_invariants()
