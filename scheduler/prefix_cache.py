"""Automatic prefix caching: find device blocks by the tokens they hold.

A full block's key is a chained hash: ``hash(parent_key, its block_size token
ids)``, the parent being the key of the block before it (empty for the first).
So one key names a block's tokens *and everything before them*, which is what
its K/V depend on: equal keys mean interchangeable blocks. blake2b (128 bits)
keeps collisions out of the question and is stable across processes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

BlockHash = bytes

ROOT: BlockHash = b""


def chain_hash(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The key of a full block holding `token_ids` after the block keyed `parent`."""
    data = struct.pack(f"<{len(token_ids)}I", *token_ids)
    return hashlib.blake2b(parent + data, digest_size=16).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, start: int = 0, parent: BlockHash = ROOT,
                 stop: int | None = None) -> Iterator[BlockHash]:
    """Keys of full blocks ``start, start + 1, ...`` (below `stop` blocks), lazily:
    a caller that stops at the first miss hashes one block past its hits."""
    end = len(token_ids) // block_size if stop is None else min(stop, len(token_ids) // block_size)
    for i in range(start, end):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        yield parent


@dataclass(slots=True)
class PrefixHit:
    """Cached device blocks holding a sequence's first ``len(block_ids)`` full blocks."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size


class PrefixCache:
    """Which device block holds which key.

    Invariants: the two maps are inverse to each other; a registered block
    holds exactly the tokens its key names (the manager registers a block only
    once its tokens' K/V are computed, and forgets it when the block is taken
    for other tokens). At most one block per key: a second block computing the
    same tokens stays unregistered.
    """

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}

    def __len__(self) -> int:
        return len(self._block_of)

    def get(self, key: BlockHash) -> int | None:
        return self._block_of.get(key)

    def hash_of(self, block_id: int) -> BlockHash | None:
        return self._hash_of.get(block_id)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def register(self, block_id: int, key: BlockHash) -> None:
        """Make `block_id` findable by `key`, unless another block already is."""
        if key not in self._block_of and block_id not in self._hash_of:
            self._block_of[key] = block_id
            self._hash_of[block_id] = key

    def forget(self, block_id: int) -> bool:
        """The block is about to hold other tokens (evicted); True if it was cached."""
        key = self._hash_of.pop(block_id, None)
        if key is None:
            return False
        del self._block_of[key]
        return True

    def clear(self) -> None:
        self._block_of.clear()
        self._hash_of.clear()

    def items(self) -> list[tuple[BlockHash, int]]:
        return list(self._block_of.items())

    def check_invariants(self) -> None:
        if len(self._block_of) != len(self._hash_of):
            raise AssertionError("prefix cache maps differ in size")
        for key, block_id in self._block_of.items():
            if self._hash_of.get(block_id) != key:
                raise AssertionError(f"block {block_id} is cached under two keys")
