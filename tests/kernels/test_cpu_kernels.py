"""kernels/cpu_kernels.py (the C++ paged decode for CPUs) against kernels/reference.py.

Unused cache slots and the output are poisoned with NaN (the kernel must never read past a
sequence's length), block tables are shuffled, contexts are not multiples of the block size.
The build must succeed here: CI machines have g++ and ninja, so a fallback would hide a defect.
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_kernels, reference


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.load() is not None, cpu_kernels.error()


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim,num_q_heads,num_kv_heads", [(64, 9, 3), (128, 8, 8), (64, 32, 8), (128, 8, 1)])
def test_decode_equals_reference(block_size, head_dim, num_q_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim + num_q_heads)
    seq_lens = [1, block_size, block_size + 1, 3 * block_size - 1, 157]
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 4
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    for b, (n, nb) in enumerate(zip(seq_lens, blocks)):
        ids, perm = perm[:nb], perm[nb:]
        tables[b, :nb] = torch.tensor(ids)
        for pos in range(n):  # only the context's slots hold numbers
            key_cache[ids[pos // block_size], pos % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
            value_cache[ids[pos // block_size], pos % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expected, got = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    reference.paged_decode_attention(expected, query, key_cache, value_cache, tables, lens, head_dim ** -0.5)
    cpu_kernels.paged_decode_attention(got, query, key_cache, value_cache, tables, lens, head_dim ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_strided_query_rows_and_int64_tables():
    """The backend passes views (rows of a mixed step) and the metadata's own dtypes."""
    gen = torch.Generator().manual_seed(7)
    key_cache, value_cache = torch.randn(12, 16, 2, 64, generator=gen), torch.randn(12, 16, 2, 64, generator=gen)
    tables = torch.randperm(12, generator=gen)[:8].view(2, 4)
    lens = torch.tensor([50, 64])
    query = torch.randn(2, 8, 2 * 64, generator=gen)[:, :, :64]  # head_dim innermost, rows strided
    expected, got = torch.empty(2, 8, 64), torch.empty(2, 8, 64)
    reference.paged_decode_attention(expected, query, key_cache, value_cache, tables, lens, 0.125)
    cpu_kernels.paged_decode_attention(got, query, key_cache, value_cache, tables, lens, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cpu_kernels.supports(query, key_cache)
    assert not cpu_kernels.supports(query.bfloat16(), key_cache.bfloat16())
