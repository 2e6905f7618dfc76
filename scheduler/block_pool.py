"""A fixed pool of KV block ids with reference counts: who may use which block.

The pool knows nothing of sequences, tokens or hashes; `BlockManager` builds
block tables and the prefix cache on top of it. The device cache and the host
swap space are one `BlockPool` each.
"""

from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocks(RuntimeError):
    """Raised when a caller takes a block without checking `num_free` first."""


class BlockPool:
    """Block ids ``[0, num_blocks)``, each free or referenced.

    Invariants (checked by `check_invariants`, held after every call):

    * a block is free exactly when its refcount is 0, and then it is in the
      free queue once;
    * the pool size never changes: free + referenced == num_blocks.

    The free queue is the eviction order: `take` hands out its head. A block
    released with ``keep=True`` (it holds prefix-cached tokens worth finding
    again) joins the tail, so cached blocks are evicted least recently used
    first; a block with nothing worth keeping joins the head and is reused
    before any cached one. `revive` takes a block out of the middle of the
    queue (a prefix-cache hit on a free block). All of these are O(1).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"a block pool cannot have {num_blocks} blocks")
        self.num_blocks = num_blocks
        self._refcounts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def free_order(self) -> list[int]:
        """The free queue, next to be taken first. O(num_free): for tests."""
        return list(self._free)

    def take(self) -> int:
        """The head of the free queue, now referenced once."""
        if not self._free:
            raise NoFreeBlocks(f"all {self.num_blocks} KV blocks are in use")
        block_id, _ = self._free.popitem(last=False)
        self._refcounts[block_id] = 1
        return block_id

    def revive(self, block_id: int) -> None:
        """Take a specific free block (a prefix-cache hit), now referenced once."""
        if self._refcounts[block_id] != 0:
            raise ValueError(f"block {block_id} is referenced; ref() it instead of revive()")
        del self._free[block_id]
        self._refcounts[block_id] = 1

    def ref(self, block_id: int) -> None:
        """One more holder of a referenced block (fork, prefix-cache hit)."""
        if self._refcounts[block_id] == 0:
            raise ValueError(f"block {block_id} is free; take() or revive() it instead of ref()")
        self._refcounts[block_id] += 1

    def unref(self, block_id: int, keep: bool = False) -> None:
        """One holder fewer; the last one returns the block to the free queue:
        at the tail when `keep` (evicted last), else at the head (reused first)."""
        count = self._refcounts[block_id]
        if count == 0:
            raise ValueError(f"block {block_id} is already free (double free)")
        self._refcounts[block_id] = count - 1
        if count == 1:
            self._free[block_id] = None
            if not keep:
                self._free.move_to_end(block_id, last=False)

    def check_invariants(self) -> None:
        """O(num_blocks): for tests and debugging, never on the per-step path."""
        if len(self._refcounts) != self.num_blocks:
            raise AssertionError("the pool changed size")
        for block_id, count in enumerate(self._refcounts):
            if count < 0:
                raise AssertionError(f"block {block_id} has refcount {count}")
            if (count == 0) != (block_id in self._free):
                raise AssertionError(f"block {block_id}: refcount {count} but in free queue: {block_id in self._free}")
        if any(not 0 <= b < self.num_blocks for b in self._free):
            raise AssertionError("the free queue holds an id outside the pool")
