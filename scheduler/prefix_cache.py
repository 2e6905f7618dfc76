"""Automatic prefix caching: find device blocks by the tokens they hold.

A full block's key is a chained hash of its tokens and everything before them
(shared/block_hash.py, which the frontend's router computes too). Every change
of which keys are cached is told to the `journal`, when one is set
(scheduler/kv_events.py publishes them to the frontends).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.block_hash import ROOT, BlockHash, block_hashes, chain_hash  # noqa: F401 (scheduler/ imports them here)


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
        self.journal = None  # a KvJournal (scheduler/kv_events.py): told each key stored or evicted

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
            if self.journal is not None:
                self.journal.stored(key)

    def forget(self, block_id: int) -> bool:
        """The block is about to hold other tokens (evicted); True if it was cached."""
        key = self._hash_of.pop(block_id, None)
        if key is None:
            return False
        del self._block_of[key]
        if self.journal is not None:
            self.journal.removed(key)
        return True

    def clear(self) -> None:
        self._block_of.clear()
        self._hash_of.clear()
        if self.journal is not None:
            self.journal.cleared()

    def items(self) -> list[tuple[BlockHash, int]]:
        return list(self._block_of.items())

    def check_invariants(self) -> None:
        if len(self._block_of) != len(self._hash_of):
            raise AssertionError("prefix cache maps differ in size")
        for key, block_id in self._block_of.items():
            if self._hash_of.get(block_id) != key:
                raise AssertionError(f"block {block_id} is cached under two keys")
