"""Block tables over a device pool and a host swap pool, with prefix caching,
fork, copy-on-write and swap."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.block_pool import BlockPool, NoFreeBlocks
from scheduler.prefix_cache import ROOT, BlockHash, PrefixCache, block_hashes

__all__ = ["BlockManager", "NoFreeBlocks", "PrefixHit"]

BlockPairs = list[tuple[int, int]]  # (src block id, dst block id)


@dataclass(slots=True)
class PrefixHit:
    """Cached device blocks holding a sequence's first ``len(block_ids)`` full blocks."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size


class BlockManager:
    """Owns every sequence's block table, on the device or swapped to the host.

    Units: a block holds `block_size` tokens. Entry i of a table is the block
    holding the sequence's tokens [i * block_size, (i + 1) * block_size).
    `num_slots` counts a table's tokens that have K/V in the cache or get it
    in the step being planned: slots are reserved before the worker writes them.

    Invariants (checked by `check_invariants`, held after every public call):

    * in each pool a block is either free or referenced, never both;
    * a block's refcount equals the number of tables (of that pool) holding it;
    * pool sizes never change;
    * no block id is in two places: never twice in a free queue, never in a
      table while free, never twice in one table; a sequence has a device
      table or a host table, never both;
    * a table with `num_slots` tokens has exactly ceil(num_slots / block_size) blocks;
    * a prefix-cached block is full and holds the tokens its chained hash names
      (it is registered only once computed, forgotten when taken for others);
      a cached block whose refcount drops to 0 stays findable until evicted;
    * only fork shares a partial block, and the first append to a shared
      partial block copies it (copy-on-write): a shared block is never written.

    The list `allocate`, `fork` and `swap_in` return is the live device table:
    this class alone changes it, and `free`/`swap_out` empty it in place.

    Eviction order (the device free queue): blocks holding nothing cached are
    reused first; cached ones least recently released first, and a table is
    released tail first, so a prefix's head outlives its tail.

    The watermark (a share of the device blocks) is kept free by admissions
    and swap-ins, so a newly admitted sequence does not evict a running one at
    its next block boundary. Every call costs O(blocks it touches).
    """

    def __init__(self, num_blocks: int, block_size: int, *, num_host_blocks: int = 0,
                 enable_prefix_caching: bool = True, watermark: float = 0.01) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 token, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_blocks)
        self._pool = BlockPool(num_blocks)
        self._host = BlockPool(num_host_blocks)
        self._cache = PrefixCache()
        self._tables: dict[int, list[int]] = {}  # device tables
        self._host_tables: dict[int, list[int]] = {}
        self._num_slots: dict[int, int] = {}  # seq id -> tokens with reserved KV (either pool)
        self._hashes: dict[int, list[BlockHash]] = {}  # seq id -> keys of its first computed full blocks
        self.blocks_allocated = 0  # fresh device blocks taken, since start
        self.blocks_evicted = 0  # cached blocks taken for other tokens, since start

    # -- sizes ---------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free device blocks, cached ones with refcount 0 included."""
        return self._pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self._pool.num_used

    @property
    def num_cached_blocks(self) -> int:
        """Device blocks findable by the prefix cache (referenced or not)."""
        return len(self._cache)

    @property
    def num_host_blocks(self) -> int:
        return self._host.num_blocks

    @property
    def num_used_host_blocks(self) -> int:
        return self._host.num_used

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def _fits(self, blocks: int, use_watermark: bool) -> bool:
        return blocks + (self.watermark_blocks if use_watermark else 0) <= self._pool.num_free

    # -- tables --------------------------------------------------------------

    def has_table(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def is_swapped(self, seq_id: int) -> bool:
        return seq_id in self._host_tables

    def block_table(self, seq_id: int) -> list[int]:
        """The live device table of `seq_id` (read it, never change it)."""
        return self._tables[seq_id]

    def host_table(self, seq_id: int) -> list[int]:
        return self._host_tables[seq_id]

    def num_slots(self, seq_id: int) -> int:
        """Tokens of `seq_id` with KV reserved in the cache (device or host)."""
        return self._num_slots[seq_id]

    def find_cached_prefix(self, token_ids: Sequence[int], max_blocks: int) -> PrefixHit:
        """The longest run of cached full blocks at the start of `token_ids`, at
        most `max_blocks` (callers keep at least one token to compute). O(hit + 1 block)."""
        hit = PrefixHit()
        if not self.enable_prefix_caching or max_blocks <= 0:
            return hit
        for key in block_hashes(token_ids, self.block_size, stop=max_blocks):
            block_id = self._cache.get(key)
            if block_id is None:
                break
            hit.block_ids.append(block_id)
            hit.hashes.append(key)
        return hit

    def can_allocate(self, num_tokens: int, hit: PrefixHit | None = None, *, use_watermark: bool = False) -> bool:
        """Whether a table of `num_tokens` slots fits, reusing `hit`'s blocks (a
        hit block that is free still leaves the free queue)."""
        reused = hit.block_ids if hit else []
        revived = sum(1 for b in reused if self._pool.refcount(b) == 0)
        return self._fits(self.blocks_needed(num_tokens) - len(reused) + revived, use_watermark)

    def allocate(self, seq_id: int, num_tokens: int, hit: PrefixHit | None = None) -> list[int]:
        """A new table with slots for `num_tokens` tokens, starting with `hit`'s
        blocks (found by `find_cached_prefix` just before); returns the live table."""
        if seq_id in self._tables or seq_id in self._host_tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        hit = hit or PrefixHit()
        if num_tokens < hit.num_tokens(self.block_size) or not self.can_allocate(num_tokens, hit):
            raise NoFreeBlocks(f"sequence {seq_id}: {num_tokens} tokens do not fit ({self._pool.num_free} free)")
        table = []
        for block_id in hit.block_ids:
            self._share(block_id)
            table.append(block_id)
        table.extend(self._take() for _ in range(self.blocks_needed(num_tokens) - len(table)))
        self._tables[seq_id] = table
        self._num_slots[seq_id] = num_tokens
        self._hashes[seq_id] = list(hit.hashes)
        return table

    def mark_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """The first `num_computed` tokens now have K/V in the cache: make the
        full blocks among them findable. O(newly full blocks)."""
        if not self.enable_prefix_caching:
            return
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        full = min(num_computed // self.block_size, len(table))
        parent = hashes[-1] if hashes else ROOT
        for key in block_hashes(token_ids, self.block_size, start=len(hashes), parent=parent, stop=full):
            self._cache.register(table[len(hashes)], key)
            hashes.append(key)

    def _needs_copy(self, seq_id: int) -> bool:
        """Whether the next append writes into a shared partial block."""
        table = self._tables[seq_id]
        return bool(self._num_slots[seq_id] % self.block_size) and self._pool.refcount(table[-1]) > 1

    def _new_blocks_for(self, seq_id: int, num_new_tokens: int) -> int:
        grow = self.blocks_needed(self._num_slots[seq_id] + num_new_tokens) - len(self._tables[seq_id])
        return grow + (1 if num_new_tokens and self._needs_copy(seq_id) else 0)

    def can_append(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether `num_new_tokens` more slots fit (the last block may have room;
        a shared partial last block costs a copy)."""
        return self._fits(self._new_blocks_for(seq_id, num_new_tokens), False)

    def append_slots(self, seq_id: int, num_new_tokens: int = 1) -> tuple[list[int], tuple[int, int] | None]:
        """Reserve `num_new_tokens` more slots. Returns the blocks appended to
        the table and, when the shared partial last block was copied first, the
        (src, dst) copy: dst replaced src as the table's last entry."""
        needed = self._new_blocks_for(seq_id, num_new_tokens)
        if needed > self._pool.num_free:
            raise NoFreeBlocks(f"sequence {seq_id} needs {needed} more blocks, {self._pool.num_free} free")
        table = self._tables[seq_id]
        copy = None
        if num_new_tokens and self._needs_copy(seq_id):
            src, dst = table[-1], self._take()
            self._pool.unref(src)  # still held by its other sharers
            table[-1] = dst
            copy = (src, dst)
        new_blocks = [self._take() for _ in range(self.blocks_needed(self._num_slots[seq_id] + num_new_tokens)
                                                  - len(table))]
        table.extend(new_blocks)
        self._num_slots[seq_id] += num_new_tokens
        return new_blocks, copy

    def fork(self, parent_id: int, child_id: int) -> list[int]:
        """Give `child_id` the parent's table, every block shared (no copy now:
        a shared partial block is copied on its first append). Returns the live table."""
        if child_id in self._tables or child_id in self._host_tables:
            raise ValueError(f"sequence {child_id} already has a block table")
        table = list(self._tables[parent_id])
        for block_id in table:
            self._pool.ref(block_id)
        self._tables[child_id] = table
        self._num_slots[child_id] = self._num_slots[parent_id]
        self._hashes[child_id] = list(self._hashes[parent_id])
        return table

    def free(self, seq_id: int) -> None:
        """Drop the device or host table of `seq_id`; blocks no other table holds
        become free (cached device blocks stay findable until evicted)."""
        if seq_id in self._host_tables:
            for block_id in self._host_tables.pop(seq_id):
                self._host.unref(block_id)
        else:
            table = self._tables.pop(seq_id)
            for block_id in reversed(table):
                self._pool.unref(block_id, keep=self._cache.is_cached(block_id))
            table.clear()
        del self._num_slots[seq_id]
        del self._hashes[seq_id]

    # -- swap ----------------------------------------------------------------

    def can_swap_out(self, seq_id: int) -> bool:
        return len(self._tables[seq_id]) <= self._host.num_free

    def swap_out(self, seq_id: int) -> BlockPairs:
        """Move `seq_id`'s table to host blocks; returns (device, host) pairs for
        the worker to copy before the device blocks are reused."""
        if not self.can_swap_out(seq_id):
            raise NoFreeBlocks(f"sequence {seq_id} needs {len(self._tables[seq_id])} host blocks, "
                               f"{self._host.num_free} free")
        table = self._tables.pop(seq_id)
        host_table = [self._host.take() for _ in table]
        pairs = list(zip(table, host_table))
        for block_id in reversed(table):
            self._pool.unref(block_id, keep=self._cache.is_cached(block_id))
        table.clear()
        self._host_tables[seq_id] = host_table
        return pairs

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 0, *, use_watermark: bool = False) -> bool:
        """Whether `seq_id` fits back with `num_new_tokens` more slots. Conservative:
        counts every block as new, though cached ones are reused."""
        return self._fits(self.blocks_needed(self._num_slots[seq_id] + num_new_tokens), use_watermark)

    def swap_in(self, seq_id: int) -> tuple[list[int], BlockPairs]:
        """Bring `seq_id` back to the device; returns its live table and the
        (host, device) pairs to copy. A full block still in the prefix cache is
        reused instead of copied."""
        if not self.can_swap_in(seq_id):
            raise NoFreeBlocks(f"sequence {seq_id} needs {len(self._host_tables[seq_id])} blocks to swap in")
        host_table = self._host_tables.pop(seq_id)
        hashes = self._hashes[seq_id]
        table, pairs = [], []
        for i, host_block in enumerate(host_table):
            cached = self._cache.get(hashes[i]) if i < len(hashes) and self.enable_prefix_caching else None
            if cached is not None:
                self._share(cached)
                table.append(cached)
            else:
                block_id = self._take()
                pairs.append((host_block, block_id))
                table.append(block_id)
                if i < len(hashes) and self.enable_prefix_caching:
                    self._cache.register(block_id, hashes[i])  # copied before the step that could read it
            self._host.unref(host_block)
        self._tables[seq_id] = table
        return table, pairs

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the worker lost its cache). Referenced
        blocks keep their contents; only findability is lost."""
        self._cache.clear()

    # -- internals -----------------------------------------------------------

    def _take(self) -> int:
        block_id = self._pool.take()
        if self._cache.forget(block_id):
            self.blocks_evicted += 1
        self.blocks_allocated += 1
        return block_id

    def _share(self, block_id: int) -> None:
        if self._pool.refcount(block_id):
            self._pool.ref(block_id)
        else:
            self._pool.revive(block_id)

    # -- checks --------------------------------------------------------------

    def free_order(self) -> list[int]:
        """Device free queue, next taken first (for tests)."""
        return self._pool.free_order()

    def cached_blocks(self) -> list[tuple[BlockHash, int]]:
        """(key, device block) of every cached block (for tests)."""
        return self._cache.items()

    def hashes(self, seq_id: int) -> list[BlockHash]:
        return list(self._hashes[seq_id])

    def check_invariants(self) -> None:
        """O(pool sizes): for tests and debugging, never on the per-step path."""
        self._pool.check_invariants()
        self._host.check_invariants()
        self._cache.check_invariants()
        if self._tables.keys() & self._host_tables.keys():
            raise AssertionError("a sequence has a device table and a host table")
        if (self._tables.keys() | self._host_tables.keys()) != self._num_slots.keys() or \
                self._num_slots.keys() != self._hashes.keys():
            raise AssertionError("tables, slot counts and hashes disagree on which sequences exist")
        for pool, tables in ((self._pool, self._tables), (self._host, self._host_tables)):
            holders = Counter(block_id for table in tables.values() for block_id in table)
            for block_id in range(pool.num_blocks):
                if pool.refcount(block_id) != holders[block_id]:
                    raise AssertionError(f"block {block_id}: refcount {pool.refcount(block_id)}, "
                                         f"held by {holders[block_id]} tables")
        for seq_id, table in (*self._tables.items(), *self._host_tables.items()):
            slots = self._num_slots[seq_id]
            if len(set(table)) != len(table):
                raise AssertionError(f"sequence {seq_id} holds a block twice: {table}")
            if len(table) != self.blocks_needed(slots):
                raise AssertionError(f"sequence {seq_id}: {len(table)} blocks for {slots} tokens")
            if len(self._hashes[seq_id]) > slots // self.block_size:
                raise AssertionError(f"sequence {seq_id} has hashes for blocks that are not full")
        for seq_id, table in self._tables.items():
            for block_id, key in zip(table, self._hashes[seq_id]):
                if self._cache.hash_of(block_id) not in (None, key):
                    raise AssertionError(f"sequence {seq_id}: block {block_id} is cached under another key")
            last = table[-1] if table else None
            if last is not None and self._num_slots[seq_id] % self.block_size == 0:
                continue
            if last is not None and self._cache.is_cached(last):
                raise AssertionError(f"sequence {seq_id}: partial block {last} is prefix-cached")
