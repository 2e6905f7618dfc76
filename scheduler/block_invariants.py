"""`BlockManager`'s invariants (its class docstring lists them), checked in tests after
every operation and never on the serving path: O(pool sizes)."""

from __future__ import annotations

from collections import Counter

from scheduler.block_pool import BlockPool
from scheduler.host_tables import HostTables
from scheduler.prefix_cache import BlockHash, PrefixCache


def check_block_tables(*, block_size: int, pool: BlockPool, tables: dict[int, list[int]], host: HostTables,
                       cache: PrefixCache, num_slots: dict[int, int], hashes: dict[int, list[BlockHash]]) -> None:
    """`tables`: device tables by seq id; `num_slots`: tokens with KV reserved per seq id (either
    pool); `hashes`: keys of each sequence's first computed full blocks."""
    pool.check_invariants()
    host.check_invariants()
    cache.check_invariants()
    host_tables = host.tables()
    if tables.keys() & host_tables.keys():
        raise AssertionError("a sequence has a device table and a host table")
    if (tables.keys() | host_tables.keys()) != num_slots.keys() or num_slots.keys() != hashes.keys():
        raise AssertionError("tables, slot counts and hashes disagree on which sequences exist")
    holders = Counter(block_id for table in tables.values() for block_id in table)
    for block_id in range(pool.num_blocks):
        if pool.refcount(block_id) != holders[block_id]:
            raise AssertionError(f"block {block_id}: refcount {pool.refcount(block_id)}, "
                                 f"held by {holders[block_id]} tables")
    for seq_id, table in (*tables.items(), *host_tables.items()):
        slots = num_slots[seq_id]
        if len(set(table)) != len(table):
            raise AssertionError(f"sequence {seq_id} holds a block twice: {table}")
        if len(table) != -(-slots // block_size):
            raise AssertionError(f"sequence {seq_id}: {len(table)} blocks for {slots} tokens")
        if len(hashes[seq_id]) > slots // block_size:
            raise AssertionError(f"sequence {seq_id} has hashes for blocks that are not full")
    for seq_id, table in tables.items():
        for block_id, key in zip(table, hashes[seq_id]):
            if cache.hash_of(block_id) not in (None, key):
                raise AssertionError(f"sequence {seq_id}: block {block_id} is cached under another key")
        last = table[-1] if table else None
        if last is not None and num_slots[seq_id] % block_size == 0:
            continue
        if last is not None and cache.is_cached(last):
            raise AssertionError(f"sequence {seq_id}: partial block {last} is prefix-cached")
