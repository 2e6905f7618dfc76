"""Random paged-cache inputs for kernel tests, built to expose wrong reads.

Caches start NaN-filled, so a kernel that reads a slot outside a sequence's context (the tail of
its last block, a padding entry of its block table, a block it does not own) returns NaN; block
ids are shuffled, so a kernel that assumes contiguous blocks reads the wrong data; block-table
padding points at other sequences' blocks or at the never-written block 0.
"""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN = float("nan")


def paged_cache(contexts: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                gen: torch.Generator, spare_blocks: int = 3):
    """K/V caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` holding random K/V for
    `contexts[b]` tokens of each sequence at shuffled blocks, NaN everywhere else.

    Returns (key_cache, value_cache, block_tables int32 ``[batch, max_blocks + 2]``)."""
    blocks_per_seq = [-(-n // block_size) for n in contexts]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, NAN, dtype=dtype)
    value_cache = torch.full(shape, NAN, dtype=dtype)
    # Block 0 is never allocated: it stays NaN, so a masked-off token whose block id defaulted
    # to 0 (a load with other=0) and was then read anyway shows up too.
    free = [i for i in torch.randperm(num_blocks, generator=gen).tolist() if i != 0]
    block_tables = torch.randint(0, num_blocks, (len(contexts), max(blocks_per_seq) + 2), generator=gen,
                                 dtype=torch.int32)
    for b, n in enumerate(contexts):
        ids = [free.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        for pos in range(n):
            key_cache[ids[pos // block_size], pos % block_size] = k[pos]
            value_cache[ids[pos // block_size], pos % block_size] = v[pos]
    return key_cache.to(DEVICE), value_cache.to(DEVICE), block_tables.to(DEVICE)


def int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: a row the kernel forgets to write fails the comparison."""
    return torch.full_like(t, NAN)
