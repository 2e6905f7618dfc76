"""BlockManager and BlockPool: exact-id unit tests (the property-based state machine is in
test_block_manager_properties.py)."""

from __future__ import annotations

import pytest

from scheduler.block_manager import BlockManager, NoFreeBlocks
from scheduler.block_pool import BlockPool


def computed(bm: BlockManager, seq_id: int, tokens: list[int], num_computed: int) -> None:
    bm.mark_computed(seq_id, tokens, num_computed)


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
    assert bm.append_slots(7, 1) == ([], None)  # token 4 fits block 0
    new, copy = bm.append_slots(7, 1)  # token 5 starts block 1
    assert len(new) == 1 and table[-1] == new[0] and len(table) == 2 and copy is None
    assert bm.append_slots(7, 8) == (table[2:], None) and len(table) == 4  # 13 tokens -> 4 blocks
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


def test_uncached_blocks_are_reused_first_most_recently_freed_first():
    bm = BlockManager(num_blocks=3, block_size=1, enable_prefix_caching=False)
    a = list(bm.allocate(0, 1))
    b = list(bm.allocate(1, 1))
    bm.free(1)
    bm.free(0)
    # nothing cached: freed blocks go to the head of the queue, the never-used one stays last
    assert bm.allocate(2, 3) == [*a, *b, 2]


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


# -- prefix caching: exact ids --------------------------------------------------

PROMPT = list(range(10, 20))  # 10 tokens: blocks of 4 -> 2 full blocks + 2 tokens


def test_computed_full_blocks_are_found_and_reused_by_id():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = list(bm.allocate(0, len(PROMPT)))
    assert bm.find_cached_prefix(PROMPT, 2).block_ids == []  # nothing computed yet: nothing findable
    computed(bm, 0, PROMPT, len(PROMPT))
    assert bm.num_cached_blocks == 2  # the partial third block is not cached
    hit = bm.find_cached_prefix(PROMPT + [99], 2)
    assert hit.block_ids == table[:2] and hit.num_tokens(4) == 8
    other = bm.allocate(1, 11, hit)
    assert other[:2] == table[:2] and other[2] not in table  # shared prefix, own tail
    assert bm.num_used_blocks == 4  # 3 + 1, not 3 + 3
    assert bm.find_cached_prefix(PROMPT[:7] + [0, 0, 0], 2).block_ids == table[:1]  # diverges in block 1
    assert bm.find_cached_prefix(PROMPT, 1).block_ids == table[:1]  # the caller's cap holds
    bm.check_invariants()


def test_a_cached_block_with_no_holder_stays_findable_until_evicted_lru_first():
    bm = BlockManager(num_blocks=6, block_size=2, watermark=0.0)
    first = list(bm.allocate(0, 4))  # tokens 1 2 | 3 4
    computed(bm, 0, [1, 2, 3, 4], 4)
    second = list(bm.allocate(1, 4))  # tokens 5 6 | 7 8
    computed(bm, 1, [5, 6, 7, 8], 4)
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    # Uncached blocks first; then cached, released earliest first, each table tail first.
    assert bm.free_order() == [4, 5, first[1], first[0], second[1], second[0]]
    hit = bm.find_cached_prefix([5, 6, 7, 8, 9], 2)
    assert hit.block_ids == second  # found though free
    bm.allocate(2, 5, hit)  # revives both, takes block 4 for the tail
    assert bm.free_order() == [5, first[1], first[0]]
    bm.allocate(3, 4)  # takes 5 and then evicts first[1]: the tail of the prefix goes before its head
    assert bm.find_cached_prefix([1, 2, 3, 4, 0], 2).block_ids == [first[0]]
    assert bm.blocks_evicted == 1
    bm.check_invariants()


def test_a_second_block_with_the_same_tokens_is_not_cached_twice():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = list(bm.allocate(0, 2)), list(bm.allocate(1, 2))
    computed(bm, 0, [7, 7], 2)
    computed(bm, 1, [7, 7], 2)
    assert bm.cached_blocks() == [(bm.hashes(0)[0], a[0])] and bm.hashes(1) == bm.hashes(0)
    bm.free(1)
    assert bm.free_order()[0] == b[0]  # uncached: reused first
    bm.check_invariants()


def test_prefix_caching_off_finds_nothing():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.allocate(0, 4)
    computed(bm, 0, [1, 2, 3, 4], 4)
    assert bm.num_cached_blocks == 0 and bm.find_cached_prefix([1, 2, 3, 4, 5], 2).block_ids == []


def test_the_watermark_is_kept_free_only_when_asked():
    bm = BlockManager(num_blocks=100, block_size=1, watermark=0.05)
    assert bm.watermark_blocks == 5
    assert bm.can_allocate(100) and not bm.can_allocate(96, use_watermark=True)
    assert bm.can_allocate(95, use_watermark=True)


# -- fork and copy-on-write -------------------------------------------------------


def test_fork_shares_every_block_and_copies_the_partial_one_on_first_write():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = bm.allocate(0, 6)  # a full block and a partial one
    child = bm.fork(0, 1)
    assert child == parent and bm.num_used_blocks == 2
    new, copy = bm.append_slots(0, 1)  # the parent writes position 6: its shared partial block is copied
    assert new == [] and copy == (child[1], parent[1]) and parent[0] == child[0] and parent[1] != child[1]
    assert bm.append_slots(1, 1) == ([], None)  # the child is the last holder: writes in place
    assert bm.num_used_blocks == 3
    bm.check_invariants()


def test_fork_of_a_block_aligned_sequence_needs_no_copy():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = list(bm.allocate(0, 8))
    bm.fork(0, 1)
    new, copy = bm.append_slots(1, 1)
    assert copy is None and len(new) == 1 and bm.block_table(1)[:2] == parent
    bm.free(0)
    assert bm.num_used_blocks == 3  # shared blocks stay for the child
    bm.check_invariants()


def test_a_copy_on_write_counts_against_free_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(0, 6)
    bm.fork(0, 1)
    assert not bm.can_append(0, 1)  # position 6 fits the block, but the block is shared and none is free
    bm.free(1)
    assert bm.can_append(0, 1)


# -- swap ---------------------------------------------------------------------------


def test_swap_out_and_in_move_tables_and_return_pairs():
    bm = BlockManager(num_blocks=4, block_size=2, num_host_blocks=3, enable_prefix_caching=False)
    table = list(bm.allocate(0, 3))
    assert bm.can_swap_out(0)
    pairs = bm.swap_out(0)
    assert [d for d, _ in pairs] == table and bm.is_swapped(0) and not bm.has_table(0)
    assert bm.num_used_blocks == 0 and bm.num_used_host_blocks == 2 and bm.num_slots(0) == 3
    host = bm.host_table(0)
    assert [h for _, h in pairs] == host
    bm.check_invariants()
    new_table, back = bm.swap_in(0)
    assert [h for h, _ in back] == host and [d for _, d in back] == new_table and bm.num_used_host_blocks == 0
    bm.check_invariants()


def test_swap_out_needs_host_room_and_swap_in_reuses_cached_blocks():
    bm = BlockManager(num_blocks=6, block_size=2, num_host_blocks=2)
    tokens = [1, 2, 3, 4, 5]
    table = list(bm.allocate(0, 5))
    computed(bm, 0, tokens, 5)
    bm.allocate(1, 2)
    assert not bm.can_swap_out(0)  # 3 blocks, 2 host blocks
    bm.free(1)
    bm = BlockManager(num_blocks=6, block_size=2, num_host_blocks=3)
    table = list(bm.allocate(0, 5))
    computed(bm, 0, tokens, 5)
    bm.swap_out(0)
    # Both full blocks are still cached on the device: only the partial one is copied back.
    new_table, pairs = bm.swap_in(0)
    assert new_table[:2] == table[:2] and len(pairs) == 1 and pairs[0][1] == new_table[2]
    bm.check_invariants()


def test_free_of_a_swapped_sequence_releases_host_blocks():
    bm = BlockManager(num_blocks=2, block_size=2, num_host_blocks=2)
    bm.allocate(0, 3)
    bm.swap_out(0)
    bm.free(0)
    assert bm.num_used_host_blocks == 0 and not bm.is_swapped(0)
    bm.check_invariants()
