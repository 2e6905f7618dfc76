"""Paged attention through torch's fused `scaled_dot_product_attention`: the fast path of the
torch backend (CPU, and CUDA without Triton). Same signatures and layouts as kernels/reference.py,
which stays the oracle these are tested against (tests/kernels/test_sdpa_paged.py).

One precondition the references do not have: cache slots outside a sequence's context must
hold finite values. SDPA gives them probability 0, and 0 * NaN would poison the value sum. The
worker zero-fills its KV cache at allocation and only ever writes model outputs into it, so
stale slots are finite.

Why it is faster than the reference: no fp32 score tensor or einsum permutes are materialized
(SDPA fuses scores, mask, softmax and the value sum); decode folds each KV head's group of query
heads into SDPA's query-length axis, so K/V are never expanded for GQA; decode rows are sorted by
context length and attended in buckets, so a short context is not padded to the longest one; a
prefill without a cached prefix attends to the step's own K/V rows, with no gather at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Decode rows attended per SDPA call, after sorting by context length: padding to the bucket's
# longest context wastes less memory traffic than padding to the batch's, while the number of
# calls per layer stays small.
DECODE_BUCKET = 16


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``[rows, n]`` block ids -> ``[rows, num_kv_heads, n * block_size, head_dim]`` (a copy, then a view)."""
    rows, n = block_ids.shape
    block_size, num_kv_heads, head_dim = cache.shape[1:]
    # index_select copies whole blocks (memcpy rows); advanced indexing is several times slower.
    gathered = cache.index_select(0, block_ids.reshape(-1))
    return gathered.view(rows, n * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _decode_rows(query, key_cache, value_cache, block_tables, seq_lens, max_len: int, scale: float):
    rows, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    n = -(-max_len // block_size)
    ids = block_tables[:, :n].long()
    k, v = _gather(key_cache, ids), _gather(value_cache, ids)
    allowed = torch.arange(n * block_size, device=query.device)[None, :] < seq_lens[:, None]
    # Query heads h*group .. h*group+group-1 read KV head h: as `group` queries of one head.
    q = query.view(rows, num_kv_heads, group, head_dim).to(k.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :], scale=scale)
    return out.reshape(rows, num_q_heads, head_dim)


def paged_decode_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale: float) -> None:
    """As reference.paged_decode_attention: out, query ``[batch, num_q_heads, head_dim]``."""
    batch = query.shape[0]
    if batch == 0:
        return
    lens = seq_lens.tolist()
    if batch <= DECODE_BUCKET:
        out.copy_(_decode_rows(query, key_cache, value_cache, block_tables, seq_lens, max(lens), scale))
        return
    order = sorted(range(batch), key=lens.__getitem__)
    for first in range(0, batch, DECODE_BUCKET):
        picked = order[first:first + DECODE_BUCKET]
        rows = torch.tensor(picked, device=query.device)
        result = _decode_rows(query[rows], key_cache, value_cache, block_tables[rows], seq_lens[rows],
                              lens[picked[-1]], scale)
        out.index_copy_(0, rows, result.to(out.dtype))


def paged_prefill_attention(out, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                            scale: float, key=None, value=None) -> None:
    """As reference.paged_prefill_attention. `key`/`value` (``[num_tokens, num_kv_heads, head_dim]``,
    optional): this step's own K/V rows, aligned with `query`; a sequence whose whole context is
    this step's chunk attends to them directly instead of gathering them back from the cache."""
    block_size = key_cache.shape[1]
    num_q_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    gqa = num_q_heads != num_kv_heads
    starts = query_start_loc.tolist()
    for b, context_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if not 0 < q_len <= context_len:
            raise ValueError(f"sequence {b}: {q_len} query tokens but a context of {context_len}")
        q = query[start:end].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        if q_len == context_len and key is not None:
            k, v = key[start:end].transpose(0, 1)[None], value[start:end].transpose(0, 1)[None]
            result = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=scale,
                                                    enable_gqa=gqa)
        else:
            n = -(-context_len // block_size)
            ids = block_tables[b:b + 1, :n].long()
            k, v = _gather(key_cache, ids)[:, :, :context_len], _gather(value_cache, ids)[:, :, :context_len]
            # Query i sits at position context_len - q_len + i and sees keys up to it.
            positions = torch.arange(context_len, device=query.device)
            allowed = positions[None, :] <= positions[context_len - q_len:, None]
            result = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=allowed[None, None], scale=scale,
                                                    enable_gqa=gqa)
        out[start:end] = result[0].transpose(0, 1).to(out.dtype)
