import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmux._native import BlockAllocator, BlockError, OutOfBlocks


def test_exception_hierarchy():
    assert issubclass(OutOfBlocks, MemoryError)
    assert issubclass(BlockError, ValueError)


def test_fresh_pool_hands_out_lowest_blocks_first():
    a = BlockAllocator(8)
    assert (a.num_blocks, a.num_free) == (8, 8)
    assert a.allocate_n(1)[0] == 0
    assert a.allocate_n(3) == [1, 2, 3]
    assert a.num_free == 4
    a.check_invariants()


def test_allocate_free_round_trip():
    a = BlockAllocator(4)
    blocks = a.allocate_n(4)
    assert sorted(blocks) == [0, 1, 2, 3]
    assert all(a.refcount(b) == 1 for b in blocks)
    assert a.num_free == 0
    a.free_blocks(blocks)
    assert a.num_free == 4
    assert all(a.refcount(b) == 0 for b in blocks)
    a.check_invariants()
    # Freed blocks are reusable.
    assert sorted(a.allocate_n(4)) == [0, 1, 2, 3]


def test_decref_reports_return_to_free_list():
    a = BlockAllocator(2)
    b = a.allocate_n(1)[0]
    a.fork([b])
    assert a.decref(b) is False
    assert a.num_free == 1
    assert a.decref(b) is True
    assert a.num_free == 2
    a.check_invariants()


def test_allocate_n_is_all_or_nothing():
    a = BlockAllocator(4)
    a.allocate_n(2)
    with pytest.raises(OutOfBlocks, match=r"need 3, 2 free of 4"):
        a.allocate_n(3)
    assert a.num_free == 2
    assert a.allocate_n(2) == [2, 3]
    assert a.allocate_n(0) == []
    a.check_invariants()


def test_allocate_on_empty_pool_raises():
    a = BlockAllocator(1)
    a.allocate_n(1)
    with pytest.raises(OutOfBlocks, match=r"out of KV blocks: need 1, 0 free of 1"):
        a.allocate_n(1)
    assert a.num_free == 0
    a.check_invariants()


def test_double_free_names_block():
    a = BlockAllocator(8)
    blocks = a.allocate_n(8)
    a.decref(blocks[7])
    with pytest.raises(BlockError, match=r"block 7 is already free"):
        a.decref(7)
    assert a.num_free == 1
    a.check_invariants()


@pytest.mark.parametrize("bad", [99, 64, -1, 2**40])
def test_unknown_block_names_block(bad):
    a = BlockAllocator(64)
    a.allocate_n(1)
    for op in (a.decref, a.refcount, lambda b: a.fork([b])):
        with pytest.raises(BlockError, match=rf"block {bad} out of range \[0, 64\)"):
            op(bad)
    assert a.num_free == 63
    a.check_invariants()


def test_negative_counts_rejected():
    with pytest.raises(BlockError):
        BlockAllocator(-1)
    a = BlockAllocator(4)
    with pytest.raises(BlockError, match="negative"):
        a.allocate_n(-1)
    assert a.num_free == 4


def test_fork_of_free_block_rejected():
    a = BlockAllocator(4)
    with pytest.raises(BlockError, match="block 2 is already free"):
        a.fork([2])
    assert a.refcount(2) == 0
    a.check_invariants()


def test_free_blocks_is_atomic():
    a = BlockAllocator(8)
    blocks = a.allocate_n(4)
    a.decref(blocks[2])
    with pytest.raises(BlockError, match=rf"block {blocks[2]} is already free"):
        a.free_blocks([blocks[0], blocks[1], blocks[2]])
    assert [a.refcount(b) for b in blocks] == [1, 1, 0, 1]
    assert a.num_free == 5
    with pytest.raises(BlockError, match="out of range"):
        a.free_blocks([blocks[0], 8])
    assert a.refcount(blocks[0]) == 1
    a.check_invariants()


def test_free_blocks_counts_repeated_blocks():
    a = BlockAllocator(4)
    b = a.allocate_n(1)[0]
    a.fork([b])
    # Two references held: the same block may appear twice...
    a.free_blocks([b, b])
    assert a.refcount(b) == 0 and a.num_free == 4
    # ...but not more often than it has references.
    c = a.allocate_n(1)[0]
    a.fork([c])
    with pytest.raises(BlockError, match=rf"block {c} freed 3 times"):
        a.free_blocks([c, c, c])
    assert a.refcount(c) == 2
    a.check_invariants()


def test_fork_increfs_each_block_atomically():
    a = BlockAllocator(6)
    blocks = a.allocate_n(3)
    a.fork(blocks)
    assert [a.refcount(b) for b in blocks] == [2, 2, 2]
    with pytest.raises(BlockError, match="block 5 is already free"):
        a.fork([blocks[0], 5])
    assert a.refcount(blocks[0]) == 2
    a.free_blocks(blocks)
    assert a.num_free == 3
    a.free_blocks(blocks)
    assert a.num_free == 6
    a.check_invariants()


class AllocatorMachine(RuleBasedStateMachine):
    """Random operations checked against a dict of refcounts."""

    NUM_BLOCKS = 12

    def __init__(self):
        super().__init__()
        self.alloc = BlockAllocator(self.NUM_BLOCKS)
        self.refs: dict[int, int] = {}  # used block -> refcount

    def used(self):
        return sorted(self.refs)

    @rule(n=st.integers(0, 5))
    def allocate_n(self, n):
        free = self.NUM_BLOCKS - len(self.refs)
        if n > free:
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate_n(n)
            return
        blocks = self.alloc.allocate_n(n)
        assert len(set(blocks)) == n
        assert not set(blocks) & set(self.refs)
        for b in blocks:
            self.refs[b] = 1

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def decref(self, data):
        b = data.draw(st.sampled_from(self.used()))
        self.refs[b] -= 1
        freed = self.refs[b] == 0
        if freed:
            del self.refs[b]
        assert self.alloc.decref(b) is freed

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def fork(self, data):
        blocks = data.draw(st.lists(st.sampled_from(self.used()), max_size=4))
        self.alloc.fork(blocks)
        for b in blocks:
            self.refs[b] += 1

    @rule(blocks=st.lists(st.integers(0, NUM_BLOCKS - 1), max_size=4))
    def free_blocks(self, blocks):
        counts = {b: blocks.count(b) for b in blocks}
        if any(self.refs.get(b, 0) < c for b, c in counts.items()):
            with pytest.raises(BlockError):
                self.alloc.free_blocks(blocks)
            return
        self.alloc.free_blocks(blocks)
        for b, c in counts.items():
            self.refs[b] -= c
            if self.refs[b] == 0:
                del self.refs[b]

    @invariant()
    def matches_model(self):
        self.alloc.check_invariants()
        assert self.alloc.num_free == self.NUM_BLOCKS - len(self.refs)
        for b in range(self.NUM_BLOCKS):
            assert self.alloc.refcount(b) == self.refs.get(b, 0)


AllocatorMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase


# -- prefix cache ------------------------------------------------------------


def test_cached_block_stays_free_but_reusable_until_evicted():
    a = BlockAllocator(3)
    b = a.allocate_n(1)[0]
    assert a.register_block(b, 11) is True
    a.decref(b)
    assert (a.num_free, a.num_cached, a.num_cached_free) == (3, 1, 1)
    assert a.lookup([11, 12]) == [b]
    blocks, hits = a.allocate_with_prefix([11], 2)  # revives b, takes one fresh block
    assert blocks[0] == b and hits == 1 and a.refcount(b) == 1
    assert (a.num_free, a.num_cached_free) == (1, 0)
    a.check_invariants()


def test_allocation_evicts_least_recently_used_cached_block_last_resort():
    a = BlockAllocator(3)
    blocks = a.allocate_n(3)
    for h, b in zip((1, 2, 3), blocks):
        a.register_block(b, h)
    a.free_blocks([blocks[1], blocks[0]])  # LRU order: blocks[1], then blocks[0]
    assert a.allocate_n(1)[0] == blocks[1]  # no plain free block left: the coldest cached one goes
    assert a.lookup([2]) == [] and a.lookup([1]) == [blocks[0]]
    assert a.num_cached == 2  # blocks[0] (free) and blocks[2] (in use)
    a.check_invariants()


def test_plain_free_blocks_are_used_before_cached_ones():
    a = BlockAllocator(2)
    b, c = a.allocate_n(2)
    a.register_block(b, 5)
    a.free_blocks([b, c])
    assert a.allocate_n(1)[0] == c
    assert a.lookup([5]) == [b]


def test_lookup_stops_at_first_miss_and_hits_in_use_blocks():
    a = BlockAllocator(4)
    b = a.allocate_n(3)
    a.register_block(b[0], 1)
    a.register_block(b[2], 3)
    assert a.lookup([1, 2, 3]) == [b[0]]
    blocks, hits = a.allocate_with_prefix([1, 2, 3], 1)
    assert blocks == [b[0]] and hits == 1 and a.refcount(b[0]) == 2
    assert a.num_shared == 1


def test_register_duplicate_content_keeps_first_block():
    a = BlockAllocator(2)
    b, c = a.allocate_n(2)
    assert a.register_block(b, 9) is True
    assert a.register_block(b, 9) is True  # idempotent
    assert a.register_block(c, 9) is False
    assert not a.has_hash(c) and a.block_hash(b) == 9
    with pytest.raises(BlockError, match="another hash"):
        a.register_block(b, 10)
    a.free_blocks([b, c])
    with pytest.raises(BlockError, match="already free"):
        a.register_block(c, 4)
    a.check_invariants()


def test_allocate_with_prefix_is_all_or_nothing():
    a = BlockAllocator(3)
    b = a.allocate_n(3)
    a.register_block(b[0], 1)
    a.free_blocks([b[0], b[1]])
    assert a.prefix_cost([1], 3) == 3  # reviving the cached free block takes room too
    with pytest.raises(OutOfBlocks):
        a.allocate_with_prefix([1], 3)
    assert a.num_free == 2 and a.lookup([1]) == [b[0]] and a.num_cached_free == 1
    a.check_invariants()


def test_evict_drops_cached_free_blocks_oldest_first():
    a = BlockAllocator(3)
    b = a.allocate_n(3)
    for h, blk in enumerate(b):
        a.register_block(blk, h + 100)
    a.free_blocks([b[2], b[0]])
    assert a.evict(1) == 1
    assert a.lookup([102]) == [] and a.lookup([100]) == [b[0]]
    assert a.evict(5) == 1 and a.num_cached == 1  # b[1] is in use: never evicted
    assert a.num_free == 2
    a.check_invariants()


HASHES = st.integers(0, 5)


class PrefixCacheMachine(RuleBasedStateMachine):
    """The allocator with its prefix cache against a plain Python model of the same rules.

    The model mirrors the exact policy: a LIFO stack of plain free blocks, an
    LRU list of cached free blocks (evicted from the front only when the stack
    is empty), hash <-> block maps, refcounts.
    """

    NUM_BLOCKS = 8

    def __init__(self):
        super().__init__()
        self.alloc = BlockAllocator(self.NUM_BLOCKS)
        self.refs = [0] * self.NUM_BLOCKS
        self.stack = list(range(self.NUM_BLOCKS - 1, -1, -1))
        self.lru: list[int] = []
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}

    # -- the model -----------------------------------------------------------

    def used(self):
        return [b for b in range(self.NUM_BLOCKS) if self.refs[b]]

    def num_free(self):
        return len(self.stack) + len(self.lru)

    def take(self):
        if self.stack:
            b = self.stack.pop()
        else:
            b = self.lru.pop(0)
            del self.by_hash[self.hash_of.pop(b)]
        self.refs[b] = 1
        return b

    def release(self, b):
        (self.lru if b in self.hash_of else self.stack).append(b)

    def decref(self, b):
        self.refs[b] -= 1
        if self.refs[b] == 0:
            self.release(b)

    def lookup(self, hashes):
        hits = []
        for h in hashes:
            if h not in self.by_hash:
                break
            hits.append(self.by_hash[h])
        return hits

    # -- rules ---------------------------------------------------------------

    @rule(n=st.integers(0, 4))
    def allocate_n(self, n):
        if n > self.num_free():
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate_n(n)
            return
        assert self.alloc.allocate_n(n) == [self.take() for _ in range(n)]

    @rule(hashes=st.lists(HASHES, max_size=4), n=st.integers(0, 5))
    def allocate_with_prefix(self, hashes, n):
        hits = self.lookup(hashes)[:n]
        cost = n - len(hits) + sum(1 for b in hits if self.refs[b] == 0)
        assert self.alloc.prefix_cost(hashes, n) == cost
        if cost > self.num_free():
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate_with_prefix(hashes, n)
            return
        for b in hits:
            if self.refs[b] == 0:
                self.lru.remove(b)
            self.refs[b] += 1
        want = hits + [self.take() for _ in range(n - len(hits))]
        assert self.alloc.allocate_with_prefix(hashes, n) == (want, len(hits))

    @rule(hashes=st.lists(HASHES, max_size=4))
    def lookup_matches(self, hashes):
        assert self.alloc.lookup(hashes) == self.lookup(hashes)

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data(), h=HASHES)
    def register(self, data, h):
        b = data.draw(st.sampled_from(self.used()))
        if b in self.hash_of:
            if self.hash_of[b] != h:
                with pytest.raises(BlockError):
                    self.alloc.register_block(b, h)
                return
            assert self.alloc.register_block(b, h) is True
        elif h in self.by_hash:
            assert self.alloc.register_block(b, h) is False
        else:
            assert self.alloc.register_block(b, h) is True
            self.by_hash[h] = b
            self.hash_of[b] = h

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def fork(self, data):
        blocks = data.draw(st.lists(st.sampled_from(self.used()), max_size=3))
        self.alloc.fork(blocks)
        for b in blocks:
            self.refs[b] += 1

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def free_some(self, data):
        # Each block at most as often as it is referenced, in a random order.
        pool = [b for b in self.used() for _ in range(self.refs[b])]
        blocks = data.draw(st.permutations(pool)).copy()[:data.draw(st.integers(1, len(pool)))]
        self.alloc.free_blocks(blocks)
        for b in blocks:
            self.decref(b)

    @rule(n=st.integers(0, 3))
    def evict(self, n):
        dropped = self.lru[:n]
        del self.lru[:n]
        for b in dropped:
            del self.by_hash[self.hash_of.pop(b)]
            self.stack.append(b)
        assert self.alloc.evict(n) == len(dropped)

    @invariant()
    def matches_model(self):
        self.alloc.check_invariants()
        assert self.alloc.num_free == self.num_free()
        assert self.alloc.num_cached == len(self.by_hash)
        assert self.alloc.num_cached_free == len(self.lru)
        assert self.alloc.num_shared == sum(1 for r in self.refs if r > 1)
        for b in range(self.NUM_BLOCKS):
            assert self.alloc.refcount(b) == self.refs[b]
            assert self.alloc.has_hash(b) == (b in self.hash_of)
        for h, b in self.by_hash.items():
            assert self.alloc.block_hash(b) == h
            assert self.alloc.lookup([h]) == [b]


PrefixCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
