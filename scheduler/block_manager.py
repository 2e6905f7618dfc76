"""Block tables: which physical KV blocks hold each sequence's tokens."""

from __future__ import annotations

from collections import Counter

from scheduler.block_pool import BlockPool, NoFreeBlocks

__all__ = ["BlockManager", "NoFreeBlocks"]


class BlockManager:
    """Owns every sequence's block table over one pool of device KV blocks.

    Units: a block holds `block_size` tokens. Entry i of a table is the
    physical block holding the sequence's tokens [i * block_size, (i + 1) * block_size).
    A table's `num_slots` counts the tokens that have KV in the cache, or are
    about to get it in the step being planned: slots are reserved before the
    worker writes them.

    Invariants (checked by `check_invariants`, held after every public call):

    * a block is either free or referenced, never both (see `BlockPool`);
    * a block's refcount equals the number of block tables holding it;
    * the pool size never changes;
    * no block id is in two places: never twice in the free queue, never in a
      table while free, never twice in one table, and, until fork or prefix
      caching share blocks, never in two tables (every refcount is 0 or 1);
    * a table with `num_slots` tokens has exactly ceil(num_slots / block_size) blocks.

    Tables are keyed by the scheduler's sequence id. The list `allocate`
    returns is the live table: this class alone changes it, and `free`
    empties it in place, so a holder of the list (``Sequence.block_table``)
    always sees the current table.

    Every call costs O(blocks it touches), never O(pool size).

    Seams for the next issues, deliberately not implemented yet:

    * prefix caching: `allocate` will first look up full blocks by a chained
      hash (hash(parent_hash, token_ids)) and `_pool.ref` the hits; `free`
      keeps hashed blocks findable while their refcount is 0;
    * fork / copy-on-write (n > 1 sharing a prompt): a `fork(parent, child)`
      refs every parent block; `append_slots` on a shared last block takes a
      fresh one and reports a (src, dst) copy;
    * swap: a host `BlockPool` next to `_pool`; swap out/in moves a table
      between pools and returns (src, dst) pairs.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 token, got {block_size}")
        self.block_size = block_size
        self._pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}
        self._num_slots: dict[int, int] = {}  # seq id -> tokens with reserved KV

    # -- sizes ---------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self._pool.num_used

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    # -- tables --------------------------------------------------------------

    def has_table(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: int) -> list[int]:
        """The live table of `seq_id` (read it, never change it)."""
        return self._tables[seq_id]

    def num_slots(self, seq_id: int) -> int:
        """Tokens of `seq_id` with KV reserved in the cache."""
        return self._num_slots[seq_id]

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self._pool.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """A new table with slots for `num_tokens` tokens; returns the live table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        if not self.can_allocate(num_tokens):
            raise NoFreeBlocks(
                f"sequence {seq_id} needs {self.blocks_needed(num_tokens)} blocks for {num_tokens} tokens, "
                f"{self._pool.num_free} free"
            )
        table = [self._pool.take() for _ in range(self.blocks_needed(num_tokens))]
        self._tables[seq_id] = table
        self._num_slots[seq_id] = num_tokens
        return table

    def _new_blocks_for(self, seq_id: int, num_new_tokens: int) -> int:
        return self.blocks_needed(self._num_slots[seq_id] + num_new_tokens) - len(self._tables[seq_id])

    def can_append(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether `num_new_tokens` more slots fit (the last block may have room)."""
        return self._new_blocks_for(seq_id, num_new_tokens) <= self._pool.num_free

    def append_slots(self, seq_id: int, num_new_tokens: int = 1) -> list[int]:
        """Reserve `num_new_tokens` more slots; returns the blocks added to the table."""
        needed = self._new_blocks_for(seq_id, num_new_tokens)
        if needed > self._pool.num_free:
            raise NoFreeBlocks(f"sequence {seq_id} needs {needed} more blocks, {self._pool.num_free} free")
        new_blocks = [self._pool.take() for _ in range(needed)]
        self._tables[seq_id].extend(new_blocks)
        self._num_slots[seq_id] += num_new_tokens
        return new_blocks

    def free(self, seq_id: int) -> None:
        """Drop the table of `seq_id`; blocks no other table holds become free."""
        table = self._tables.pop(seq_id)
        del self._num_slots[seq_id]
        for block_id in table:
            self._pool.unref(block_id)
        table.clear()

    # -- checks --------------------------------------------------------------

    def check_invariants(self) -> None:
        """O(pool size): for tests and debugging, never on the per-step path."""
        self._pool.check_invariants()
        holders = Counter(block_id for table in self._tables.values() for block_id in table)
        for block_id in range(self.num_blocks):
            count = self._pool.refcount(block_id)
            if count != holders[block_id]:
                raise AssertionError(f"block {block_id}: refcount {count}, held by {holders[block_id]} tables")
            if count > 1:  # nothing shares blocks until fork / prefix caching land
                raise AssertionError(f"block {block_id} is in {count} tables")
        if self._tables.keys() != self._num_slots.keys():
            raise AssertionError("tables and slot counts disagree on which sequences exist")
        for seq_id, table in self._tables.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"sequence {seq_id} holds a block twice: {table}")
            if len(table) != self.blocks_needed(self._num_slots[seq_id]):
                raise AssertionError(
                    f"sequence {seq_id}: {len(table)} blocks for {self._num_slots[seq_id]} tokens "
                    f"(block_size {self.block_size})"
                )
