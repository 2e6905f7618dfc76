"""A fixed pool of KV block ids with reference counts: who may use which block.

The pool knows nothing of sequences or tokens; `BlockManager` builds block
tables on top of it. The host swap pool (next issue) is a second `BlockPool`.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    """Raised when a caller takes a block without checking `num_free` first."""


class BlockPool:
    """Block ids ``[0, num_blocks)``, each free or referenced.

    Invariants (checked by `check_invariants`, held after every call):

    * a block is free exactly when its refcount is 0, and then it is in the
      free queue once;
    * the pool size never changes: free + referenced == num_blocks.

    The free queue is in release order (oldest first): `take` hands out the
    block released longest ago. Prefix caching (next issue) relies on that
    order to evict the least recently used cached block, and will drop the
    evicted block's hash in `take`.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refcounts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def take(self) -> int:
        """A free block, now referenced once. O(1)."""
        if not self._free:
            raise NoFreeBlocks(f"all {self.num_blocks} KV blocks are in use")
        block_id = self._free.popleft()
        self._refcounts[block_id] = 1
        return block_id

    def ref(self, block_id: int) -> None:
        """One more holder of a referenced block (fork, prefix-cache hit)."""
        if self._refcounts[block_id] == 0:
            raise ValueError(f"block {block_id} is free; take() it instead of ref()")
        self._refcounts[block_id] += 1

    def unref(self, block_id: int) -> None:
        """One holder fewer; the last one returns the block to the free queue."""
        count = self._refcounts[block_id]
        if count == 0:
            raise ValueError(f"block {block_id} is already free (double free)")
        self._refcounts[block_id] = count - 1
        if count == 1:
            self._free.append(block_id)

    def check_invariants(self) -> None:
        """O(num_blocks): for tests and debugging, never on the per-step path."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block id is in the free queue twice")
        if len(self._refcounts) != self.num_blocks:
            raise AssertionError("the pool changed size")
        for block_id, count in enumerate(self._refcounts):
            if count < 0:
                raise AssertionError(f"block {block_id} has refcount {count}")
            if (count == 0) != (block_id in free):
                raise AssertionError(f"block {block_id}: refcount {count} but in free queue: {block_id in free}")
