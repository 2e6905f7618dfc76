"""kernels/reference.py against dense attention (torch SDPA in float64 on contiguous K/V).

Caches start NaN-filled and block tables are shuffled and padded with ids of other sequences'
blocks, so reading a slot outside a sequence's context, or a wrong block, shows up as NaN or as
a mismatch. Output buffers start NaN-filled too, so an unwritten row fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def make_paged(contexts, block_size, num_kv_heads, head_dim, dtype, gen, spare_blocks=5):
    """Dense K/V per sequence, written into NaN caches at shuffled blocks.

    Returns (key_cache, value_cache, block_tables int32, dense list of (k, v) float32).
    """
    blocks_per_seq = [-(-n // block_size) for n in contexts]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + 2
    # Padding entries point at arbitrary (NaN or foreign) blocks: they must never be read.
    block_tables = torch.randint(0, num_blocks, (len(contexts), max_blocks), generator=gen, dtype=torch.int32)
    dense = []
    for b, n in enumerate(contexts):
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        ids = [free.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(n):
            key_cache[ids[pos // block_size], pos % block_size] = k[pos]
            value_cache[ids[pos // block_size], pos % block_size] = v[pos]
        dense.append((k.float(), v.float()))
    return key_cache, value_cache, block_tables, dense


def dense_attention(q, k, v, query_positions, scale):
    """q ``[Q, Hq, D]``, k/v ``[L, Hkv, D]``; query i attends to keys at positions <= query_positions[i]."""
    mask = torch.arange(k.shape[0])[None, :] <= query_positions[:, None]
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1)[None], k.double().transpose(0, 1)[None], v.double().transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_writes_only_its_slots(dtype):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads, dim = 6, 4, 2, 8
    key_cache = torch.full((num_blocks, block_size, heads, dim), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:10]
    slots[3] = -1  # a padding token: skipped
    key = torch.randn(10, heads, dim, generator=gen).to(dtype)
    value = torch.randn(10, heads, dim, generator=gen).to(dtype)
    reference.reshape_and_cache(key, value, key_cache, value_cache, slots)
    flat_k, flat_v = key_cache.view(-1, heads, dim), value_cache.view(-1, heads, dim)
    written = slots[slots >= 0]
    torch.testing.assert_close(flat_k[written], key[slots >= 0], rtol=0, atol=0)
    torch.testing.assert_close(flat_v[written], value[slots >= 0], rtol=0, atol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[written] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (3, 3), (2, 4)])
def test_paged_decode_matches_dense(num_kv_heads, group, block_size, dtype):
    gen = torch.Generator().manual_seed(1)
    head_dim, num_q_heads = 32, num_kv_heads * group
    contexts = [1, 7, block_size, block_size + 1, 50, 33]
    key_cache, value_cache, block_tables, dense = make_paged(contexts, block_size, num_kv_heads, head_dim, dtype, gen)
    query = torch.randn(len(contexts), num_q_heads, head_dim, generator=gen).to(dtype)
    out = torch.full_like(query, float("nan"))
    scale = head_dim ** -0.5
    seq_lens = torch.tensor(contexts, dtype=torch.int32)
    reference.paged_decode_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale)
    for b, n in enumerate(contexts):
        k, v = dense[b]
        expected = dense_attention(query[b : b + 1].float(), k, v, torch.tensor([n - 1]), scale)[0]
        torch.testing.assert_close(out[b].double(), expected, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (3, 3), (1, 4)])
def test_paged_prefill_matches_dense(num_kv_heads, group, block_size, dtype):
    gen = torch.Generator().manual_seed(2)
    head_dim, num_q_heads = 16, num_kv_heads * group
    # (new tokens, context): full prompts, chunks after a cached prefix, a single-token chunk.
    chunks = [(5, 5), (1, 17), (20, 33), (16, 16), (3, 40), (block_size, 2 * block_size)]
    contexts = [c for _, c in chunks]
    key_cache, value_cache, block_tables, dense = make_paged(contexts, block_size, num_kv_heads, head_dim, dtype, gen)
    q_lens = torch.tensor([q for q, _ in chunks])
    query_start_loc = torch.zeros(len(chunks) + 1, dtype=torch.int32)
    query_start_loc[1:] = q_lens.cumsum(0)
    query = torch.randn(int(q_lens.sum()), num_q_heads, head_dim, generator=gen).to(dtype)
    out = torch.full_like(query, float("nan"))
    scale = head_dim ** -0.5
    seq_lens = torch.tensor(contexts, dtype=torch.int32)
    reference.paged_prefill_attention(out, query, key_cache, value_cache, block_tables, query_start_loc,
                                      seq_lens, scale)
    for b, (q_len, n) in enumerate(chunks):
        k, v = dense[b]
        rows = slice(int(query_start_loc[b]), int(query_start_loc[b + 1]))
        expected = dense_attention(query[rows].float(), k, v, torch.arange(n - q_len, n), scale)
        torch.testing.assert_close(out[rows].double(), expected, rtol=0, atol=TOL[dtype])


def test_memory_bounded_groups_and_chunks_match_dense(monkeypatch):
    """A tiny budget forces decode into groups of 2 sequences and prefill into 3-query chunks."""
    gen = torch.Generator().manual_seed(8)
    contexts, heads, dim = [5, 30, 12, 1, 19], 2, 8
    key_cache, value_cache, block_tables, dense = make_paged(contexts, 4, heads, dim, torch.float32, gen)
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 2 * max(contexts) * heads * dim)
    query = torch.randn(len(contexts), heads, dim, generator=gen)
    out = torch.full_like(query, float("nan"))
    reference.paged_decode_attention(out, query, key_cache, value_cache, block_tables, int32(contexts), 0.3)
    for b, n in enumerate(contexts):
        expected = dense_attention(query[b : b + 1], *dense[b], torch.tensor([n - 1]), 0.3)[0]
        torch.testing.assert_close(out[b].double(), expected, rtol=0, atol=2e-5)
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 3 * heads * max(contexts))
    n = contexts[1]
    prompt_query = torch.randn(n, heads, dim, generator=gen)
    out = torch.full_like(prompt_query, float("nan"))
    reference.paged_prefill_attention(out, prompt_query, key_cache, value_cache, block_tables[1:2],
                                      int32([0, n]), int32([n]), 0.3)
    expected = dense_attention(prompt_query, *dense[1], torch.arange(n), 0.3)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def test_prefill_of_one_token_equals_decode():
    gen = torch.Generator().manual_seed(3)
    contexts = [3, 9, 30]
    key_cache, value_cache, block_tables, _ = make_paged(contexts, 8, 2, 16, torch.float32, gen)
    query = torch.randn(3, 6, 16, generator=gen)
    seq_lens = torch.tensor(contexts, dtype=torch.int32)
    decode_out, prefill_out = torch.empty_like(query), torch.empty_like(query)
    reference.paged_decode_attention(decode_out, query, key_cache, value_cache, block_tables, seq_lens, 0.25)
    reference.paged_prefill_attention(prefill_out, query, key_cache, value_cache, block_tables,
                                      torch.tensor([0, 1, 2, 3], dtype=torch.int32), seq_lens, 0.25)
    torch.testing.assert_close(decode_out, prefill_out, rtol=1e-6, atol=1e-6)


def test_prefill_longer_than_one_query_chunk():
    gen = torch.Generator().manual_seed(4)
    n = reference._PREFILL_QUERY_CHUNK + 77
    key_cache, value_cache, block_tables, dense = make_paged([n], 16, 1, 8, torch.float32, gen)
    query = torch.randn(n, 2, 8, generator=gen)
    out = torch.full_like(query, float("nan"))
    reference.paged_prefill_attention(out, query, key_cache, value_cache, block_tables,
                                      int32([0, n]), int32([n]), 0.3)
    k, v = dense[0]
    torch.testing.assert_close(out.double(), dense_attention(query, k, v, torch.arange(n), 0.3), rtol=0, atol=2e-5)


def test_write_then_read_roundtrip_through_reshape_and_cache():
    """The model's order: write this step's K/V, then attend over the cache."""
    gen = torch.Generator().manual_seed(5)
    block_size, heads, dim, n = 4, 2, 8, 11
    key_cache = torch.full((8, block_size, heads, dim), float("nan"))
    value_cache = key_cache.clone()
    blocks = torch.tensor([6, 1, 4], dtype=torch.int32)
    positions = torch.arange(n)
    slots = blocks.long()[positions // block_size] * block_size + positions % block_size
    k, v = torch.randn(n, heads, dim, generator=gen), torch.randn(n, heads, dim, generator=gen)
    reference.reshape_and_cache(k, v, key_cache, value_cache, slots)
    query = torch.randn(n, 4, dim, generator=gen)
    out = torch.full_like(query, float("nan"))
    reference.paged_prefill_attention(out, query, key_cache, value_cache, blocks[None],
                                      int32([0, n]), int32([n]), 0.5)
    torch.testing.assert_close(out.double(), dense_attention(query, k, v, positions, 0.5), rtol=0, atol=2e-5)


def test_copy_blocks_copies_every_layer():
    gen = torch.Generator().manual_seed(6)
    keys = [torch.randn(5, 2, 1, 4, generator=gen) for _ in range(3)]
    values = [torch.randn(5, 2, 1, 4, generator=gen) for _ in range(3)]
    before_k, before_v = [k.clone() for k in keys], [v.clone() for v in values]
    pairs = torch.tensor([[0, 3], [2, 4]])
    reference.copy_blocks(keys, values, pairs)
    for cache, before in zip(keys + values, before_k + before_v):
        torch.testing.assert_close(cache[3], before[0], rtol=0, atol=0)
        torch.testing.assert_close(cache[4], before[2], rtol=0, atol=0)
        torch.testing.assert_close(cache[:3], before[:3], rtol=0, atol=0)


def test_swap_blocks_roundtrip():
    gen = torch.Generator().manual_seed(7)
    device_cache = torch.randn(6, 4, 2, 8, generator=gen)
    host_cache = torch.full((3, 4, 2, 8), float("nan"))
    reference.swap_blocks(device_cache, host_cache, torch.tensor([[5, 0], [1, 2]]))
    torch.testing.assert_close(host_cache[0], device_cache[5], rtol=0, atol=0)
    torch.testing.assert_close(host_cache[2], device_cache[1], rtol=0, atol=0)
    assert host_cache[1].isnan().all()
    restored = torch.zeros_like(device_cache)
    reference.swap_blocks(host_cache, restored, torch.tensor([[0, 3], [2, 4]]))
    torch.testing.assert_close(restored[3], device_cache[5], rtol=0, atol=0)
    torch.testing.assert_close(restored[4], device_cache[1], rtol=0, atol=0)
