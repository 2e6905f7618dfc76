"""Host swap space: the block tables of sequences swapped out of the device.

`BlockManager` (scheduler/block_manager.py) decides what moves; this class only
keeps the host side's books. The worker copies the bytes, following the
(src, dst) pairs the manager returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import KeysView

from scheduler.block_pool import BlockPool

BlockPairs = list[tuple[int, int]]  # (src block id, dst block id)


class HostTables:
    """Host block tables over one `BlockPool` of `num_blocks` host blocks.

    Host blocks are never shared: a swap-out gives each device block a host
    block of its own, so every referenced host block is in exactly one table,
    once (refcount 1). Checked by `check_invariants`.
    """

    def __init__(self, num_blocks: int) -> None:
        self._pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}  # seq id -> host blocks, in the order of its device table

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_used(self) -> int:
        return self._pool.num_used

    @property
    def num_free(self) -> int:
        return self._pool.num_free

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> KeysView[int]:
        return self._tables.keys()

    def table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def tables(self) -> dict[int, list[int]]:
        """Every host table by seq id (read them, never change them)."""
        return self._tables

    def can_hold(self, num_blocks: int) -> bool:
        return num_blocks <= self._pool.num_free

    def store(self, seq_id: int, device_table: list[int]) -> BlockPairs:
        """A host block for each block of `device_table`, as `seq_id`'s host table;
        returns the (device, host) pairs the worker copies. The caller checked `can_hold`."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} is swapped out already")
        host_table = [self._pool.take() for _ in device_table]
        self._tables[seq_id] = host_table
        return list(zip(device_table, host_table))

    def release(self, seq_id: int) -> list[int]:
        """Drop `seq_id`'s host table, its blocks free again; returns it (swap-in
        pairs its blocks with device ones, copied before the host blocks are reused)."""
        host_table = self._tables.pop(seq_id)
        for block_id in host_table:
            self._pool.unref(block_id)
        return host_table

    def check_invariants(self) -> None:
        """O(host blocks): for tests."""
        self._pool.check_invariants()
        holders = Counter(block_id for table in self._tables.values() for block_id in table)
        for block_id in range(self._pool.num_blocks):
            if self._pool.refcount(block_id) != holders[block_id]:
                raise AssertionError(f"host block {block_id}: refcount {self._pool.refcount(block_id)}, "
                                     f"held by {holders[block_id]} tables")
