"""BlockManager and BlockPool: exact-id unit tests and a property-based state
machine that simulates the cache contents the worker would hold."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.block_manager import BlockManager, NoFreeBlocks
from scheduler.block_pool import BlockPool
from scheduler.prefix_cache import block_hashes


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


# -- property-based: random operations, simulated cache contents ------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate (with prefix lookup) / compute / append / fork / free /
    swap / evict. The test plays the worker: it writes tokens into simulated
    blocks, applies swap and copy pairs, and checks after every operation that
    each sequence's table reads back its tokens and that every cached key maps
    to a block holding exactly the tokens the key names."""

    def __init__(self):
        super().__init__()
        self.bm: BlockManager | None = None
        self.tokens: dict[int, list[int]] = {}  # seq id -> its tokens (all have slots)
        self.done: dict[int, int] = {}  # seq id -> computed tokens (written to the cache)
        self.device: dict[int, list] = {}  # block -> token per slot
        self.host: dict[int, list] = {}
        self.key_tokens: dict[bytes, list[int]] = {}  # every key ever seen -> its block's tokens
        self.next_id = 0

    @precondition(lambda self: self.bm is None)
    @rule(num_blocks=st.integers(1, 16), block_size=st.sampled_from([1, 2, 4]), host=st.integers(0, 8),
          caching=st.booleans())
    def create(self, num_blocks, block_size, host, caching):
        self.bm = BlockManager(num_blocks, block_size, num_host_blocks=host, enable_prefix_caching=caching)
        self.bs = block_size

    def _on_device(self):
        return sorted(s for s in self.tokens if self.bm.has_table(s))

    @precondition(lambda self: self.bm is not None)
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=24), data=st.data())
    def allocate(self, tokens, data):
        bm = self.bm
        hit = bm.find_cached_prefix(tokens, (len(tokens) - 1) // self.bs)
        cached = hit.num_tokens(self.bs)
        for i, block in enumerate(hit.block_ids):
            assert self.device[block] == tokens[i * self.bs:(i + 1) * self.bs], "a hit holds other tokens"
        num = data.draw(st.integers(cached + 1, len(tokens)))
        if not bm.can_allocate(num, hit):
            with pytest.raises(NoFreeBlocks):
                bm.allocate(self.next_id, num, hit)
            return
        bm.allocate(self.next_id, num, hit)
        self.tokens[self.next_id], self.done[self.next_id] = tokens[:num], cached
        self.next_id += 1

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def compute(self, data):
        """The worker writes every reserved slot; full blocks become findable."""
        seq_ids = [s for s in self._on_device() if self.done[s] < len(self.tokens[s])]
        if not seq_ids:
            return
        seq_id = data.draw(st.sampled_from(seq_ids))
        table, tokens = self.bm.block_table(seq_id), self.tokens[seq_id]
        for pos in range(self.done[seq_id], len(tokens)):
            block = table[pos // self.bs]
            assert self.bm._pool.refcount(block) == 1, "a write into a shared block"
            self.device.setdefault(block, [None] * self.bs)[pos % self.bs] = tokens[pos]
        self.done[seq_id] = len(tokens)
        self.bm.mark_computed(seq_id, tokens, len(tokens))
        for i, key in enumerate(self.bm.hashes(seq_id)):
            self.key_tokens[key] = tokens[i * self.bs:(i + 1) * self.bs]

    def _computed_on_device(self):
        return [s for s in self._on_device() if self.done[s] == len(self.tokens[s])]

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, new):
        seq_ids = self._computed_on_device()
        if not seq_ids:
            return
        seq_id = data.draw(st.sampled_from(seq_ids))
        bm = self.bm
        if not bm.can_append(seq_id, len(new)):
            with pytest.raises(NoFreeBlocks):
                bm.append_slots(seq_id, len(new))
            return
        before = list(bm.block_table(seq_id))
        added, copy = bm.append_slots(seq_id, len(new))
        if copy is not None:
            assert copy[0] == before[-1] and bm.block_table(seq_id)[len(before) - 1] == copy[1]
            self.device[copy[1]] = list(self.device[copy[0]])
        assert bm.block_table(seq_id)[len(before):] == added
        self.tokens[seq_id] = self.tokens[seq_id] + new

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        seq_ids = self._computed_on_device()
        if not seq_ids:
            return
        parent = data.draw(st.sampled_from(seq_ids))
        assert self.bm.fork(parent, self.next_id) == self.bm.block_table(parent)
        self.tokens[self.next_id], self.done[self.next_id] = list(self.tokens[parent]), self.done[parent]
        self.next_id += 1

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq_id)
        del self.tokens[seq_id], self.done[seq_id]

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def swap_out(self, data):
        seq_ids = self._computed_on_device()
        if not seq_ids:
            return
        seq_id = data.draw(st.sampled_from(seq_ids))
        if not self.bm.can_swap_out(seq_id):
            with pytest.raises(NoFreeBlocks):
                self.bm.swap_out(seq_id)
            return
        for device, host in self.bm.swap_out(seq_id):
            self.host[host] = list(self.device[device])

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def swap_in(self, data):
        seq_ids = [s for s in sorted(self.tokens) if self.bm.is_swapped(s)]
        if not seq_ids:
            return
        seq_id = data.draw(st.sampled_from(seq_ids))
        if not self.bm.can_swap_in(seq_id):
            return
        table, pairs = self.bm.swap_in(seq_id)
        for host, device in pairs:
            self.device[device] = list(self.host[host])
        assert table == self.bm.block_table(seq_id)

    @invariant()
    def invariants_hold(self):
        bm = self.bm
        if bm is None:
            return
        bm.check_invariants()
        bs = self.bs
        for seq_id, tokens in self.tokens.items():
            assert bm.num_slots(seq_id) == len(tokens)
            if bm.has_table(seq_id):
                table = bm.block_table(seq_id)
                got = [self.device[table[p // bs]][p % bs] for p in range(self.done[seq_id])]
                assert got == tokens[:self.done[seq_id]], f"sequence {seq_id} reads other tokens"
                keys = list(block_hashes(tokens, bs, stop=self.done[seq_id] // bs))
                assert bm.hashes(seq_id) == keys[:len(bm.hashes(seq_id))]
        for key, block in bm.cached_blocks():
            assert self.device[block] == self.key_tokens[key], f"cached block {block} holds other tokens"
        used = {b for s in self.tokens if bm.has_table(s) for b in bm.block_table(s)}
        assert len(used) + bm.num_free_blocks == bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=50, deadline=None)
TestBlockManagerProperties = BlockManagerMachine.TestCase
