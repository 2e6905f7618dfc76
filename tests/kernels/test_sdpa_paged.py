"""kernels/sdpa_paged.py (the torch backend's fast path) against kernels/reference.py.

Random caches whose unused slots hold large finite garbage (the precondition: the worker
zero-fills, never NaN), shuffled non-contiguous block tables, contexts that are not multiples
of the block size, mixed lengths, batches over one decode bucket, and outputs poisoned first.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference, sdpa_paged


def _cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    # Garbage of a different scale in every slot: rows that leak into a result show up.
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=gen) * 30).to(dtype), (torch.randn(shape, generator=gen) * 30).to(dtype)


def _tables(seq_lens, block_size, num_blocks, gen):
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_needed)
    rows = []
    for n in blocks_needed:
        row, perm = perm[:n], perm[n:]
        rows.append(row + [0] * (width - n))  # padding: any valid id
    return torch.tensor(rows, dtype=torch.int32)


CASES = [  # block_size, head_dim, num_q_heads, num_kv_heads, seq_lens
    (16, 64, 9, 3, [1, 17, 33, 250]),
    (8, 64, 8, 8, [5, 8, 9, 100]),
    (32, 128, 32, 8, [31, 64, 65]),
    (16, 64, 8, 1, [3, 70]),
    (16, 32, 4, 2, [int(x) for x in torch.randint(1, 200, (40,), generator=torch.Generator().manual_seed(3))]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,head_dim,num_q_heads,num_kv_heads,seq_lens", CASES)
def test_decode_equals_reference(block_size, head_dim, num_q_heads, num_kv_heads, seq_lens, dtype):
    gen = torch.Generator().manual_seed(len(seq_lens) * 7 + block_size)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5
    key_cache, value_cache = _cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = _tables(seq_lens, block_size, num_blocks, gen)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expected, got = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    reference.paged_decode_attention(expected, query, key_cache, value_cache, tables, lens, head_dim ** -0.5)
    sdpa_paged.paged_decode_attention(got, query, key_cache, value_cache, tables, lens, head_dim ** -0.5)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * 30)


@pytest.mark.parametrize("with_step_kv", [False, True])
@pytest.mark.parametrize("block_size,head_dim,num_q_heads,num_kv_heads,seq_lens", CASES[:4])
def test_prefill_equals_reference(block_size, head_dim, num_q_heads, num_kv_heads, seq_lens, with_step_kv):
    """Each sequence computes a chunk at its end: the whole context (fresh prefill) for even
    rows, the last few tokens after a cached prefix for odd rows."""
    gen = torch.Generator().manual_seed(block_size + head_dim)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5
    key_cache, value_cache = _cache(num_blocks, block_size, num_kv_heads, head_dim, torch.float32, gen)
    tables = _tables(seq_lens, block_size, num_blocks, gen)
    q_lens = [n if b % 2 == 0 else max(1, n // 3) for b, n in enumerate(seq_lens)]
    start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen)
    # The step's own K/V, written into the cache where the worker would have put them.
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    slots = []
    for b, (n, q_len) in enumerate(zip(seq_lens, q_lens)):
        for pos in range(n - q_len, n):
            slots.append(int(tables[b, pos // block_size]) * block_size + pos % block_size)
    reference.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor(slots))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expected, got = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    reference.paged_prefill_attention(expected, query, key_cache, value_cache, tables, start_loc, lens,
                                      head_dim ** -0.5)
    sdpa_paged.paged_prefill_attention(got, query, key_cache, value_cache, tables, start_loc, lens, head_dim ** -0.5,
                                       key if with_step_kv else None, value if with_step_kv else None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
