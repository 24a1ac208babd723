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
    assert a.allocate() == 0
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
    b = a.allocate()
    a.incref(b)
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
    a.allocate()
    with pytest.raises(OutOfBlocks, match=r"out of KV blocks: need 1, 0 free of 1"):
        a.allocate()
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
    a.allocate()
    for op in (a.decref, a.incref, a.refcount, a.copy_on_write):
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


def test_incref_of_free_block_rejected():
    a = BlockAllocator(4)
    with pytest.raises(BlockError, match="block 2 is already free"):
        a.incref(2)
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
    b = a.allocate()
    a.incref(b)
    # Two references held: the same block may appear twice...
    a.free_blocks([b, b])
    assert a.refcount(b) == 0 and a.num_free == 4
    # ...but not more often than it has references.
    c = a.allocate()
    a.incref(c)
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


def test_copy_on_write_sole_owner_keeps_block():
    a = BlockAllocator(4)
    b = a.allocate()
    assert a.copy_on_write(b) == (b, False)
    assert a.refcount(b) == 1 and a.num_free == 3
    a.check_invariants()


def test_copy_on_write_shared_block_moves_one_reference():
    a = BlockAllocator(4)
    b = a.allocate()
    a.incref(b)
    new, copied = a.copy_on_write(b)
    assert copied is True and new != b
    assert a.refcount(b) == 1 and a.refcount(new) == 1
    assert a.num_free == 2
    a.check_invariants()


def test_copy_on_write_of_free_block_rejected():
    a = BlockAllocator(4)
    with pytest.raises(BlockError, match="block 1 is already free"):
        a.copy_on_write(1)


def test_copy_on_write_atomic_when_out_of_blocks():
    a = BlockAllocator(2)
    b, _ = a.allocate_n(2)
    a.incref(b)
    with pytest.raises(OutOfBlocks, match="need 1, 0 free of 2"):
        a.copy_on_write(b)
    assert a.refcount(b) == 2 and a.num_free == 0
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
    def incref(self, data):
        b = data.draw(st.sampled_from(self.used()))
        self.alloc.incref(b)
        self.refs[b] += 1

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

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def copy_on_write(self, data):
        b = data.draw(st.sampled_from(self.used()))
        if self.refs[b] == 1:
            assert self.alloc.copy_on_write(b) == (b, False)
        elif len(self.refs) == self.NUM_BLOCKS:
            with pytest.raises(OutOfBlocks):
                self.alloc.copy_on_write(b)
        else:
            new, copied = self.alloc.copy_on_write(b)
            assert copied and new not in self.refs
            self.refs[b] -= 1
            self.refs[new] = 1

    @invariant()
    def matches_model(self):
        self.alloc.check_invariants()
        assert self.alloc.num_free == self.NUM_BLOCKS - len(self.refs)
        for b in range(self.NUM_BLOCKS):
            assert self.alloc.refcount(b) == self.refs.get(b, 0)


AllocatorMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase
