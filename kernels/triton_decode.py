"""Triton paged decode attention: one query token per sequence over its whole paged context.

Same contract as kernels.reference.paged_decode_attention (layouts, units, in-place ``out``):
query/out ``[batch, num_q_heads, head_dim]``, caches ``[num_blocks, block_size, num_kv_heads,
head_dim]``, block_tables int32 ``[batch, max_blocks]``, seq_lens int32 ``[batch]`` in tokens
(>= 1, including the current token, whose K/V is already cached).

How it reads memory (decode is bound by the K/V bytes it reads):

* Grid ``(batch, num_kv_heads, num_splits)``. A program owns one KV head of one sequence and all
  ``group = num_q_heads // num_kv_heads`` query heads that share it, so each K/V block is read
  from memory once per KV head, not once per query head. The group is padded to 16 rows
  (masked) so ``tl.dot`` compiles on tensor cores.
* Tokens are taken ``BLOCK_N`` at a time; each token finds its block through the block table
  (``block_tables[b, pos // block_size]``), so any block size and any non-contiguous table work.
  Slots past ``seq_len`` are masked at load time (``other=0``) and their scores set to -inf: the
  NaN a stale slot may hold never reaches the sums.
* Split-KV: with few sequences the grid would not fill the GPU, so each sequence's context is
  cut into ``num_splits`` ranges (multiples of BLOCK_N tokens), each producing a partial output
  and its log-sum-exp in fp32; ``_reduce_kernel`` merges them. ``num_splits == 1`` writes ``out``
  directly and launches no reduce.
* Softmax is online (running max and sum) in fp32, in base 2 (``exp2``, scale folded with log2 e).

The number of splits is chosen on the host from shapes only (batch, heads, block-table width),
never from ``seq_lens`` values, so no device sync happens here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_utils import MIN_DOT, check_cache, dot_precision, interpreting, next_pow2, num_sms

LOG2E = math.log2(math.e)
MAX_SPLITS = 32
MIN_SPLIT_TOKENS = 256  # below this, a split's fixed cost (its partial write and reduce) dominates


@triton.jit
def _decode_kernel(
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_lse,
    scale_log2,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_ob, stride_oh,  # query/out [batch, Hq, D], unit stride on D
    stride_cb, stride_co, stride_ch,  # caches: per block, per token in block, per kv head (elements)
    stride_bt,  # block_tables row stride (entries)
    num_q_heads, block_size, head_dim, group,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, MIXED: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    row = b  # of query/out
    if MIXED:  # a mixed step: only one-token chunks are ours; the rest get an empty range
        row = tl.load(query_start_loc + b)
        seq_len = tl.where(tl.load(query_start_loc + b + 1) - row == 1, seq_len, 0)
    # Each sequence cuts its own context: splits of one sequence get equal work (to BLOCK_N).
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    q = tl.load(query + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(key_cache.dtype.element_ty)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = block_tables + b.to(tl.int64) * stride_bt
    for first in range(start, end, BLOCK_N):
        pos = first + offs_n
        n_mask = pos < end
        block_id = tl.load(table + pos // block_size, mask=n_mask, other=0).to(tl.int64)
        kv_off = block_id * stride_cb + (pos % block_size) * stride_co + kv_head * stride_ch
        k = tl.load(key_cache + kv_off[None, :] + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N] fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds >= 1 valid token, so m_new is finite and no row turns NaN.
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(value_cache + kv_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    # An empty split (or a seq_len 0 row) has l == 0: write 0 with lse -inf, never 0/0.
    result = acc / tl.where(l > 0, l, 1.0)[:, None]
    # (Scalar conditions enter masks as bounds: the interpreter rejects `block & scalar` masks.)
    out_mask = (offs_g[:, None] < tl.where(seq_len > 0, group, 0)) & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 result.to(out.dtype.element_ty), mask=out_mask)
    else:
        row = (b * num_q_heads + heads) * NUM_SPLITS + split  # part_* are [batch, Hq, NUM_SPLITS(, D)]
        tl.store(part_out + row[:, None] * head_dim + offs_d[None, :], result, mask=out_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse + row, lse, mask=g_mask)


@triton.jit
def _reduce_kernel(
    part_out, part_lse, query_start_loc, out, stride_ob, stride_oh, num_q_heads, head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, MIXED: tl.constexpr,
):
    """Grid (batch, num_q_heads): merge the splits' partial outputs, weighted by exp2(lse)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    out_row = b
    d_end = head_dim  # 0 for a row that is not ours, so nothing is stored
    if MIXED:
        out_row = tl.load(query_start_loc + b)
        d_end = tl.where(tl.load(query_start_loc + b + 1) - out_row == 1, head_dim, 0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < head_dim
    row = (b * num_q_heads + h) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse + row, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all splits empty: weights 0, not NaN
    w = tl.exp2(lse - top)
    o = tl.load(part_out + row[:, None] * head_dim + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                other=0.0)
    total = tl.sum(w, 0)
    result = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + out_row * stride_ob + h * stride_oh + offs_d, result.to(out.dtype.element_ty),
             mask=offs_d < d_end)


def choose_num_splits(batch: int, num_kv_heads: int, max_context_tokens: int, device: torch.device) -> int:
    """Splits per sequence: enough programs for two waves over the SMs, each split >= 256
    tokens, a power of two <= 32 (each value is a separate compiled kernel)."""
    wanted = triton.cdiv(2 * num_sms(device), max(1, batch * num_kv_heads))
    by_length = max(1, max_context_tokens // MIN_SPLIT_TOKENS)
    splits = max(1, min(wanted, by_length, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)


def paged_decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    query_start_loc: torch.Tensor | None = None,
) -> None:
    """Write softmax(q K^T * scale) V of each sequence's single query into ``out`` (in place).

    Keyword-only extras (the reference has neither):

    * ``num_splits`` forces the split-KV factor (tests, benchmarks); by default
      :func:`choose_num_splits` picks it.
    * ``query_start_loc`` int32 ``[batch+1]``: a mixed step. query/out are then the step's flat
      ``[num_tokens, num_q_heads, head_dim]``; sequence b's query is row ``query_start_loc[b]``
      and only sequences with exactly one query token are computed (the others' rows are left
      for the prefill kernel with ``skip_decodes=True``), without gathering rows or syncing.

    The query is cast to the cache dtype for the dot products; accumulation is fp32 throughout.
    seq_lens must be >= 1 for every computed sequence.
    """
    check_cache(key_cache, value_cache)
    _, num_q_heads, head_dim = query.shape
    batch = seq_lens.shape[0]
    if batch == 0 or query.shape[0] == 0:
        return
    mixed = query_start_loc is not None
    if not mixed and query.shape[0] != batch:
        raise ValueError(f"{query.shape[0]} query rows for {batch} sequences")
    _, block_size, num_kv_heads, _ = key_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, query.device)
    query = query if query.stride(2) == 1 else query.contiguous()
    target = out if out.stride(2) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    block_d = next_pow2(head_dim)
    if num_splits > 1:
        part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=query.device)
    else:  # unused by the kernel: NUM_SPLITS == 1 compiles those stores away
        part_out = part_lse = target
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc if mixed else seq_lens,
        target, part_out, part_lse, scale * LOG2E,
        query.stride(0), query.stride(1), target.stride(0), target.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        num_q_heads, block_size, head_dim, group,
        BLOCK_H=max(MIN_DOT, next_pow2(group)), BLOCK_N=_block_n(query.device), BLOCK_D=block_d,
        NUM_SPLITS=num_splits, DOT_PRECISION=dot_precision(key_cache.dtype), MIXED=mixed,
    )
    if num_splits > 1:
        _reduce_kernel[(batch, num_q_heads)](
            part_out, part_lse, query_start_loc if mixed else seq_lens, target, target.stride(0), target.stride(1),
            num_q_heads, head_dim, NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
            MIXED=mixed,
        )
    if target is not out:
        out.copy_(target)


def _block_n(device: torch.device) -> int:
    """Tokens per tile: 64 on a GPU (a first guess, tuned by bench/kernels.py), 16 when
    interpreting (numpy cost grows with the tile, the test contexts are short)."""
    return MIN_DOT if interpreting() or device.type != "cuda" else 64
