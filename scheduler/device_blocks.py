"""The device KV blocks: a `BlockPool` with the prefix cache on top.

`BlockManager` (scheduler/block_manager.py) decides which table holds which
block; this class decides which block id a table gets next, and which blocks
stay findable by their tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.block_pool import BlockPool
from scheduler.prefix_cache import BlockHash, PrefixCache, PrefixHit, block_hashes


class DeviceBlocks:
    """`num_blocks` device blocks of `block_size` tokens.

    Eviction order (the free queue): blocks holding nothing cached are reused
    first; cached ones least recently released first. Taking a cached block for
    other tokens forgets it (an eviction). A cached block with no holder stays
    findable until then.

    The watermark (`watermark` of the blocks) is what admissions and swap-ins
    leave free (`fits(..., use_watermark=True)`), so a newly admitted sequence
    does not evict a running one at its next block boundary.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool, watermark: float) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_blocks)
        self.pool = BlockPool(num_blocks)
        self.cache = PrefixCache()
        self.blocks_allocated = 0  # fresh blocks taken, since start
        self.blocks_evicted = 0  # cached blocks taken for other tokens, since start

    def fits(self, blocks: int, use_watermark: bool) -> bool:
        return blocks + (self.watermark_blocks if use_watermark else 0) <= self.pool.num_free

    def take(self) -> int:
        """A free block for new tokens (referenced once); what it cached is forgotten."""
        block_id = self.pool.take()
        if self.cache.forget(block_id):
            self.blocks_evicted += 1
        self.blocks_allocated += 1
        return block_id

    def share(self, block_id: int) -> None:
        """One more holder of a cached block, which may have had none (then it leaves the free queue)."""
        if self.pool.refcount(block_id):
            self.pool.ref(block_id)
        else:
            self.pool.revive(block_id)

    def release(self, block_id: int) -> None:
        """One holder fewer: the last one frees it, a cached block at the tail of the free queue
        (evicted last), any other at the head (reused first)."""
        self.pool.unref(block_id, keep=self.cache.is_cached(block_id))

    def find_prefix(self, token_ids: Sequence[int], max_blocks: int) -> PrefixHit:
        """The longest run of cached full blocks at the start of `token_ids`, at most
        `max_blocks`. O(hit + 1 block)."""
        hit = PrefixHit()
        if not self.enable_prefix_caching or max_blocks <= 0:
            return hit
        for key in block_hashes(token_ids, self.block_size, stop=max_blocks):
            block_id = self.cache.get(key)
            if block_id is None:
                break
            hit.block_ids.append(block_id)
            hit.hashes.append(key)
        return hit

    def cached(self, key: BlockHash) -> int | None:
        """The block holding `key`'s tokens, if prefix caching is on and one does."""
        return self.cache.get(key) if self.enable_prefix_caching else None

    def register(self, block_id: int, key: BlockHash) -> None:
        """`block_id` holds (or, copied before the step that reads it, will hold) `key`'s tokens."""
        if self.enable_prefix_caching:
            self.cache.register(block_id, key)
