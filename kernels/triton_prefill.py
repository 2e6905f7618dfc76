"""Triton paged prefill/extend attention: causal attention for a varlen batch of query chunks,
reading every key and value (the cached prefix and the chunk's own, already written) through the
block table. One kernel serves a fresh prompt, a chunk of a long prompt (chunked prefill), the
uncached tail after a prefix-cache hit, and recompute after preemption.

Same contract as kernels.reference.paged_prefill_attention: query/out ``[num_tokens,
num_q_heads, head_dim]``; sequence b's queries are rows ``query_start_loc[b]:query_start_loc[b+1]``
(int32 ``[batch+1]``); seq_lens int32 ``[batch]`` is each sequence's whole context in tokens,
new tokens included; query i of sequence b sits at position ``seq_lens[b] - q_len_b + i`` and
attends to positions ``<=`` its own. A sequence with ``q_len == 0`` is skipped.

Grid ``(query tile, q head, sequence)``: a program takes BLOCK_M queries of one head (a
FlashAttention-2 forward: online softmax in fp32, base 2). Keys come BLOCK_N at a time in two
phases: tiles wholly at or before the tile's first query position need no causal mask; the rest
(the diagonal) are masked by ``key_pos <= query_pos`` and ``key_pos < seq_len``. Loads past the
context are masked (``other=0``), so NaN in unused cache slots never enters. Query heads of one
GQA group read the same K/V tiles, mostly from L2.

The grid's tile count needs the longest chunk on the host: pass ``max_query_len`` when known,
else it costs one device sync.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_utils import MIN_DOT, check_cache, dot_precision, interpreting, next_pow2

LOG2E = math.log2(math.e)


@triton.jit
def _prefill_kernel(
    query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, out,
    scale_log2,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,  # query/out [num_tokens, Hq, D], unit stride on D
    stride_cb, stride_co, stride_ch,  # caches: per block, per token in block, per kv head (elements)
    stride_bt,  # block_tables row stride (entries)
    block_size, head_dim, group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SKIP_DECODES: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    context = tl.load(seq_lens + b)
    prefix = context - q_len  # tokens cached before this chunk
    if SKIP_DECODES:  # a one-token chunk belongs to the decode kernel in a mixed step
        q_len = tl.where(q_len == 1, 0, q_len)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < head_dim
    q_pos = prefix + offs_m
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(query + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(key_cache.dtype.element_ty)

    # Keys [0, kv_end) are needed; the first `full_end` of them precede every query of the tile.
    tile_used = tile * BLOCK_M < q_len
    first_pos = prefix + tile * BLOCK_M
    kv_end = tl.where(tile_used, tl.minimum(first_pos + BLOCK_M, context), 0)
    full_end = (tl.minimum(first_pos + 1, kv_end) // BLOCK_N) * BLOCK_N

    kv_head = head // group
    table = block_tables + b.to(tl.int64) * stride_bt
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Phase 1: no causal mask (every key here is <= the tile's first query position < context).
    for first in range(0, full_end, BLOCK_N):
        pos = first + offs_n
        block_id = tl.load(table + pos // block_size).to(tl.int64)
        kv_off = block_id * stride_cb + (pos % block_size) * stride_co + kv_head * stride_ch
        k = tl.load(key_cache + kv_off[None, :] + offs_d[:, None], mask=d_mask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(value_cache + kv_off[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    # Phase 2: the diagonal. Key 0 is visible to every row and was in the first tile seen, so
    # m is finite in every row from then on and a fully masked row-tile adds exp2(-inf) = 0.
    for first in range(full_end, kv_end, BLOCK_N):
        pos = first + offs_n
        n_mask = pos < kv_end
        block_id = tl.load(table + pos // block_size, mask=n_mask, other=0).to(tl.int64)
        kv_off = block_id * stride_cb + (pos % block_size) * stride_co + kv_head * stride_ch
        k = tl.load(key_cache + kv_off[None, :] + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(value_cache + kv_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    result = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             result.to(out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    skip_decodes: bool = False,
) -> None:
    """Causal attention of each query chunk over its paged context, written into ``out`` in place.

    ``max_query_len`` (keyword only): the longest chunk in tokens, if the caller knows it (saves
    a device sync). ``skip_decodes`` (keyword only): leave sequences with exactly one query token
    alone (a mixed step, whose decodes the decode kernel computes). Unlike the reference, chunk
    lengths are not validated (that would sync too): ``0 <= q_len <= seq_len`` is the caller's
    invariant.
    """
    check_cache(key_cache, value_cache)
    num_tokens, num_q_heads, head_dim = query.shape
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return
    _, block_size, num_kv_heads, _ = key_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return
    block_m, block_n, num_warps, num_stages = _tiles(query.device, head_dim)
    query = query if query.stride(2) == 1 else query.contiguous()
    target = out if out.stride(2) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(max_query_len, block_m), num_q_heads, batch)
    _prefill_kernel[grid](
        query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, target,
        scale * LOG2E,
        query.stride(0), query.stride(1), target.stride(0), target.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        block_size, head_dim, num_q_heads // num_kv_heads,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(head_dim), DOT_PRECISION=dot_precision(key_cache.dtype),
        SKIP_DECODES=skip_decodes, num_warps=num_warps, num_stages=num_stages,
    )
    if target is not out:
        out.copy_(target)


def _tiles(device: torch.device, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). GPU values are a first guess for H100 (FA2-like
    128x64 for head_dim <= 128), to be tuned with bench/kernels.py; the interpreter gets the
    smallest tiles tl.dot allows, since test chunks are short."""
    if interpreting() or device.type != "cuda":
        return MIN_DOT, MIN_DOT, 4, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2
