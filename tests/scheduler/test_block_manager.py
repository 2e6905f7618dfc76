"""BlockManager and BlockPool: unit tests and a property-based state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.block_manager import BlockManager, NoFreeBlocks
from scheduler.block_pool import BlockPool


def test_allocate_takes_ceil_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=10, block_size=4)
    table = bm.allocate(seq_id=1, num_tokens=9)  # 9 tokens -> 3 blocks of 4
    assert len(table) == 3 and bm.num_free_blocks == 7 and bm.num_slots(1) == 9
    bm.check_invariants()
    bm.free(1)
    assert table == [] and bm.num_free_blocks == 10 and not bm.has_table(1)
    bm.check_invariants()


def test_append_uses_room_in_the_last_block_before_taking_a_new_one():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(7, 3)
    assert bm.append_slots(7, 1) == []  # token 4 fits block 0
    new = bm.append_slots(7, 1)  # token 5 starts block 1
    assert len(new) == 1 and table[-1] == new[0] and len(table) == 2
    assert bm.append_slots(7, 8) == table[2:] and len(table) == 4  # 13 tokens -> 4 blocks
    bm.check_invariants()


def test_can_allocate_and_can_append_match_the_free_count():
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.can_allocate(6) and not bm.can_allocate(7)
    bm.allocate(0, 4)  # 2 blocks, 1 free
    assert bm.can_append(0, 2) and not bm.can_append(0, 3)
    with pytest.raises(NoFreeBlocks):
        bm.append_slots(0, 3)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(1, 3)
    bm.check_invariants()  # failed calls change nothing
    assert bm.num_used_blocks == 2 and bm.num_slots(0) == 4


def test_allocating_a_table_twice_is_an_error():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(0, 1)
    with pytest.raises(ValueError):
        bm.allocate(0, 1)


def test_freed_blocks_are_reused_oldest_first():
    bm = BlockManager(num_blocks=3, block_size=1)
    a = list(bm.allocate(0, 1))
    b = list(bm.allocate(1, 1))
    bm.free(1)
    bm.free(0)
    # the never-used block went back first, then b's, then a's
    assert bm.allocate(2, 3) == [2, *b, *a]


def test_pool_refcounts_and_double_free():
    pool = BlockPool(2)
    block = pool.take()
    pool.ref(block)
    assert pool.refcount(block) == 2
    pool.unref(block)
    assert pool.num_free == 1  # still held once
    pool.unref(block)
    assert pool.num_free == 2
    with pytest.raises(ValueError):
        pool.unref(block)
    with pytest.raises(ValueError):
        pool.ref(block)
    pool.check_invariants()


def test_check_invariants_catches_a_corrupted_table():
    bm = BlockManager(num_blocks=4, block_size=2)
    table = bm.allocate(0, 3)
    table.append(table[0])  # simulate a bug that aliases a block
    with pytest.raises(AssertionError):
        bm.check_invariants()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / free against a model of each table's token count."""

    def __init__(self):
        super().__init__()
        self.bm: BlockManager | None = None
        self.model: dict[int, int] = {}  # seq id -> tokens with slots
        self.next_id = 0

    @precondition(lambda self: self.bm is None)
    @rule(num_blocks=st.integers(1, 16), block_size=st.sampled_from([1, 2, 4, 16]))
    def create(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)

    @precondition(lambda self: self.bm is not None)
    @rule(num_tokens=st.integers(1, 70))
    def allocate(self, num_tokens):
        bm = self.bm
        expected = bm.blocks_needed(num_tokens) <= bm.num_free_blocks
        assert bm.can_allocate(num_tokens) == expected
        if not expected:
            with pytest.raises(NoFreeBlocks):
                bm.allocate(self.next_id, num_tokens)
            return
        free_before = bm.num_free_blocks
        table = bm.allocate(self.next_id, num_tokens)
        assert free_before - bm.num_free_blocks == len(table)
        self.model[self.next_id] = num_tokens
        self.next_id += 1

    @precondition(lambda self: self.bm is not None and self.model)
    @rule(data=st.data(), num_new=st.integers(1, 20))
    def append(self, data, num_new):
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        bm = self.bm
        table = bm.block_table(seq_id)
        needed = bm.blocks_needed(self.model[seq_id] + num_new) - len(table)
        assert bm.can_append(seq_id, num_new) == (needed <= bm.num_free_blocks)
        if needed > bm.num_free_blocks:
            with pytest.raises(NoFreeBlocks):
                bm.append_slots(seq_id, num_new)
            return
        before = list(table)
        new = bm.append_slots(seq_id, num_new)
        assert len(new) == needed and table == before + new
        self.model[seq_id] += num_new

    @precondition(lambda self: self.bm is not None and self.model)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        held = len(self.bm.block_table(seq_id))
        free_before = self.bm.num_free_blocks
        self.bm.free(seq_id)
        del self.model[seq_id]
        assert self.bm.num_free_blocks == free_before + held

    @invariant()
    def invariants_hold(self):
        if self.bm is None:
            return
        self.bm.check_invariants()
        for seq_id, num_tokens in self.model.items():
            assert self.bm.num_slots(seq_id) == num_tokens
        held = sum(len(self.bm.block_table(s)) for s in self.model)
        assert held + self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManagerProperties = BlockManagerMachine.TestCase
