"""BlockManager, property-based: random operations on a state machine that simulates the
cache contents the worker would hold."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.block_manager import BlockManager, NoFreeBlocks
from scheduler.prefix_cache import block_hashes


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
            assert self.bm.refcount(block) == 1, "a write into a shared block"
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
