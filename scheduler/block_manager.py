"""Block tables over a device pool and a host swap pool, with prefix caching,
fork, copy-on-write and swap."""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.block_invariants import check_block_tables
from scheduler.block_pool import NoFreeBlocks
from scheduler.device_blocks import DeviceBlocks
from scheduler.host_tables import BlockPairs, HostTables
from scheduler.prefix_cache import ROOT, BlockHash, PrefixHit, block_hashes

__all__ = ["BlockManager", "BlockPairs", "NoFreeBlocks", "PrefixHit"]


class BlockManager:
    """Owns every sequence's block table, on the device or swapped to the host.

    Units: a block holds `block_size` tokens. Entry i of a table is the block
    holding the sequence's tokens [i * block_size, (i + 1) * block_size).
    `num_slots` counts a table's tokens that have K/V in the cache or get it
    in the step being planned: slots are reserved before the worker writes them.

    Invariants (checked by `check_invariants`, held after every public call):

    * in each pool a block is either free or referenced, never both;
    * a block's refcount equals the number of tables (of that pool) holding it
      (host blocks are never shared: scheduler/host_tables.py);
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
    this class alone changes it, and `free`/`swap_out` empty it in place. A table
    is released tail first, so a cached prefix's head outlives its tail
    (eviction order and the watermark: scheduler/device_blocks.py).
    Every call costs O(blocks it touches).
    """

    def __init__(self, num_blocks: int, block_size: int, *, num_host_blocks: int = 0,
                 enable_prefix_caching: bool = True, watermark: float = 0.01) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 token, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self._device = DeviceBlocks(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                                    watermark=watermark)
        self._host = HostTables(num_host_blocks)  # tables of the swapped sequences
        self._tables: dict[int, list[int]] = {}  # device tables
        self._num_slots: dict[int, int] = {}  # seq id -> tokens with reserved KV (either pool)
        self._hashes: dict[int, list[BlockHash]] = {}  # seq id -> keys of its first computed full blocks

    # -- sizes ---------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._device.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free device blocks, cached ones with refcount 0 included."""
        return self._device.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self._device.pool.num_used

    prefix_cache = property(lambda self: self._device.cache)  # scheduler/kv_events.py attaches its journal
    @property
    def num_cached_blocks(self) -> int:
        """Device blocks findable by the prefix cache (referenced or not)."""
        return len(self._device.cache)

    @property
    def num_host_blocks(self) -> int:
        return self._host.num_blocks

    @property
    def num_used_host_blocks(self) -> int:
        return self._host.num_used

    @property
    def watermark_blocks(self) -> int:
        return self._device.watermark_blocks

    @property
    def blocks_allocated(self) -> int:  # since start (scheduler/device_blocks.py)
        return self._device.blocks_allocated

    @property
    def blocks_evicted(self) -> int:  # since start
        return self._device.blocks_evicted

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    # -- tables --------------------------------------------------------------

    def has_table(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def is_swapped(self, seq_id: int) -> bool:
        return seq_id in self._host

    def block_table(self, seq_id: int) -> list[int]:
        """The live device table of `seq_id` (read it, never change it)."""
        return self._tables[seq_id]

    def host_table(self, seq_id: int) -> list[int]:
        return self._host.table(seq_id)

    def num_slots(self, seq_id: int) -> int:
        """Tokens of `seq_id` with KV reserved in the cache (device or host)."""
        return self._num_slots[seq_id]

    def find_cached_prefix(self, token_ids: Sequence[int], max_blocks: int) -> PrefixHit:
        """The longest run of cached full blocks at the start of `token_ids`, at
        most `max_blocks` (callers keep at least one token to compute). O(hit + 1 block)."""
        return self._device.find_prefix(token_ids, max_blocks)

    def can_allocate(self, num_tokens: int, hit: PrefixHit | None = None, *, use_watermark: bool = False) -> bool:
        """Whether a table of `num_tokens` slots fits, reusing `hit`'s blocks (a
        hit block that is free still leaves the free queue)."""
        reused = hit.block_ids if hit else []
        revived = sum(1 for b in reused if self._device.pool.refcount(b) == 0)
        return self._device.fits(self.blocks_needed(num_tokens) - len(reused) + revived, use_watermark)

    def allocate(self, seq_id: int, num_tokens: int, hit: PrefixHit | None = None) -> list[int]:
        """A new table with slots for `num_tokens` tokens, starting with `hit`'s
        blocks (found by `find_cached_prefix` just before); returns the live table."""
        if seq_id in self._tables or seq_id in self._host:
            raise ValueError(f"sequence {seq_id} already has a block table")
        hit = hit or PrefixHit()
        if num_tokens < hit.num_tokens(self.block_size) or not self.can_allocate(num_tokens, hit):
            raise NoFreeBlocks(f"sequence {seq_id}: {num_tokens} tokens do not fit ({self.num_free_blocks} free)")
        table = []
        for block_id in hit.block_ids:
            self._device.share(block_id)
            table.append(block_id)
        table.extend(self._device.take() for _ in range(self.blocks_needed(num_tokens) - len(table)))
        self._tables[seq_id] = table
        self._num_slots[seq_id] = num_tokens
        self._hashes[seq_id] = list(hit.hashes)
        return table

    def mark_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """The first `num_computed` tokens now have K/V in the cache: make the
        full blocks among them findable. O(newly full blocks)."""
        if not self._device.enable_prefix_caching:
            return
        table, hashes = self._tables[seq_id], self._hashes[seq_id]
        full = min(num_computed // self.block_size, len(table))
        parent = hashes[-1] if hashes else ROOT
        for key in block_hashes(token_ids, self.block_size, start=len(hashes), parent=parent, stop=full):
            self._device.register(table[len(hashes)], key)
            hashes.append(key)

    def _needs_copy(self, seq_id: int) -> bool:
        """Whether the next append writes into a shared partial block."""
        table = self._tables[seq_id]
        return bool(self._num_slots[seq_id] % self.block_size) and self._device.pool.refcount(table[-1]) > 1

    def _new_blocks_for(self, seq_id: int, num_new_tokens: int) -> int:
        grow = self.blocks_needed(self._num_slots[seq_id] + num_new_tokens) - len(self._tables[seq_id])
        return grow + (1 if num_new_tokens and self._needs_copy(seq_id) else 0)

    def can_append(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether `num_new_tokens` more slots fit (the last block may have room;
        a shared partial last block costs a copy)."""
        return self._device.fits(self._new_blocks_for(seq_id, num_new_tokens), False)

    def append_slots(self, seq_id: int, num_new_tokens: int = 1) -> tuple[list[int], tuple[int, int] | None]:
        """Reserve `num_new_tokens` more slots. Returns the blocks appended to
        the table and, when the shared partial last block was copied first, the
        (src, dst) copy: dst replaced src as the table's last entry."""
        needed = self._new_blocks_for(seq_id, num_new_tokens)
        if needed > self.num_free_blocks:
            raise NoFreeBlocks(f"sequence {seq_id} needs {needed} more blocks, {self.num_free_blocks} free")
        table = self._tables[seq_id]
        copy = None
        if num_new_tokens and self._needs_copy(seq_id):
            src, dst = table[-1], self._device.take()
            self._device.release(src)  # still held by its other sharers
            table[-1] = dst
            copy = (src, dst)
        new_blocks = [self._device.take() for _ in range(self.blocks_needed(self._num_slots[seq_id] + num_new_tokens)
                                                  - len(table))]
        table.extend(new_blocks)
        self._num_slots[seq_id] += num_new_tokens
        return new_blocks, copy

    def fork(self, parent_id: int, child_id: int) -> list[int]:
        """Give `child_id` the parent's table, every block shared (no copy now:
        a shared partial block is copied on its first append). Returns the live table."""
        if child_id in self._tables or child_id in self._host:
            raise ValueError(f"sequence {child_id} already has a block table")
        table = list(self._tables[parent_id])
        for block_id in table:
            self._device.pool.ref(block_id)
        self._tables[child_id] = table
        self._num_slots[child_id] = self._num_slots[parent_id]
        self._hashes[child_id] = list(self._hashes[parent_id])
        return table

    def free(self, seq_id: int) -> None:
        """Drop the device or host table of `seq_id`; blocks no other table holds
        become free (cached device blocks stay findable until evicted)."""
        if seq_id in self._host:
            self._host.release(seq_id)
        else:
            table = self._tables.pop(seq_id)
            for block_id in reversed(table):
                self._device.release(block_id)
            table.clear()
        del self._num_slots[seq_id]
        del self._hashes[seq_id]

    # -- swap ----------------------------------------------------------------

    def can_swap_out(self, seq_id: int) -> bool:
        return self._host.can_hold(len(self._tables[seq_id]))

    def swap_out(self, seq_id: int) -> BlockPairs:
        """Move `seq_id`'s table to host blocks; returns (device, host) pairs for
        the worker to copy before the device blocks are reused."""
        if not self.can_swap_out(seq_id):
            raise NoFreeBlocks(f"sequence {seq_id} needs {len(self._tables[seq_id])} host blocks, "
                               f"{self._host.num_free} free")
        table = self._tables.pop(seq_id)
        pairs = self._host.store(seq_id, table)
        for block_id in reversed(table):
            self._device.release(block_id)
        table.clear()
        return pairs

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 0, *, use_watermark: bool = False) -> bool:
        """Whether `seq_id` fits back with `num_new_tokens` more slots. Conservative:
        counts every block as new, though cached ones are reused."""
        return self._device.fits(self.blocks_needed(self._num_slots[seq_id] + num_new_tokens), use_watermark)

    def swap_in(self, seq_id: int) -> tuple[list[int], BlockPairs]:
        """Bring `seq_id` back to the device; returns its live table and the
        (host, device) pairs to copy. A full block still in the prefix cache is
        reused instead of copied."""
        if not self.can_swap_in(seq_id):
            raise NoFreeBlocks(f"sequence {seq_id} needs {len(self._host.table(seq_id))} blocks to swap in")
        host_table = self._host.release(seq_id)  # its blocks are copied before any host block is reused
        hashes = self._hashes[seq_id]
        table, pairs = [], []
        for i, host_block in enumerate(host_table):
            cached = self._device.cached(hashes[i]) if i < len(hashes) else None
            if cached is not None:
                self._device.share(cached)
                table.append(cached)
            else:
                block_id = self._device.take()
                pairs.append((host_block, block_id))
                table.append(block_id)
                if i < len(hashes):
                    self._device.register(block_id, hashes[i])  # copied before the step that could read it
        self._tables[seq_id] = table
        return table, pairs

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the worker lost its cache). Referenced
        blocks keep their contents; only findability is lost."""
        self._device.cache.clear()

    # -- checks --------------------------------------------------------------

    def free_order(self) -> list[int]:
        """Device free queue, next taken first (for tests)."""
        return self._device.pool.free_order()

    def cached_blocks(self) -> list[tuple[BlockHash, int]]:
        """(key, device block) of every cached block (for tests)."""
        return self._device.cache.items()

    def refcount(self, block_id: int) -> int:
        """Tables holding device block `block_id` (for tests)."""
        return self._device.pool.refcount(block_id)

    def hashes(self, seq_id: int) -> list[BlockHash]:
        return list(self._hashes[seq_id])

    def check_invariants(self) -> None:
        """O(pool sizes): for tests and debugging, never on the per-step path."""
        check_block_tables(block_size=self.block_size, pool=self._device.pool, tables=self._tables, host=self._host,
                           cache=self._device.cache, num_slots=self._num_slots, hashes=self._hashes)
