"""The prefix cache's block keys, shared by the scheduler (which caches blocks by them) and the
frontend (which routes a prompt to the replica holding most of its blocks, frontend/router.py).

A full block's key is a chained hash: ``hash(parent_key, its block_size token ids)``, the parent
being the key of the block before it (empty for the first). So one key names a block's tokens
*and everything before them*, which is what its K/V depend on: equal keys mean interchangeable
blocks. blake2b (128 bits) keeps collisions out of the question and is stable across processes,
so both sides compute the same keys from the same token ids.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence

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


def route_key(key: BlockHash) -> int:
    """A block key as it travels in `KvEvents`: its first 8 bytes as an unsigned int. Half the
    bytes on the wire; a collision (2**-64 per pair) can only mis-route a request, never change
    its tokens, since the scheduler looks its cache up by the whole key."""
    return int.from_bytes(key[:8], "little")
