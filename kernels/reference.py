"""Torch reference ops for the paged KV cache: the oracle every other backend is tested against.

Layouts and units (shared with the Triton kernels, which keep these exact signatures):

* KV cache of one layer: ``key_cache``/``value_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``.
* A slot is a token's place in the cache: ``slot = block_id * block_size + offset`` (offset in tokens).
* ``block_tables`` int32 ``[batch, max_blocks]``: row b lists sequence b's physical block ids in
  logical order; entries past the sequence's last block are padding: any valid block id (the
  references may gather it, never use it).
* ``seq_lens`` int32 ``[batch]``: context length in tokens, including the tokens of this step.
* GQA: ``num_q_heads`` is a multiple of ``num_kv_heads``; query head h reads kv head
  ``h // (num_q_heads // num_kv_heads)`` (the Hugging Face ``repeat_kv`` grouping).

Cache contents outside a sequence's context (padding blocks, the tail of its last block) may hold
anything, NaN included: the references mask them out of both softmax and the value sum. Outputs are
written in place into ``out``; softmax is computed in float32 whatever the cache dtype.
"""

from __future__ import annotations

import torch

# Prefill attends in chunks of at most this many queries, fewer for long contexts, so the fp32
# score matrix (num_q_heads * chunk * context floats) stays near _SCORE_BUDGET floats (256 MiB);
# decode gathers K/V for groups of sequences under the same bound.
_PREFILL_QUERY_CHUNK = 1024
_SCORE_BUDGET = 1 << 26


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V row into its cache slot.

    key, value: ``[num_tokens, num_kv_heads, head_dim]``.
    key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (written in place).
    slot_mapping: int64 ``[num_tokens]``; a negative slot marks a padding token that is not written.
    """
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(value_cache.dtype))


def _gather_context(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``[..., n_blocks]`` block ids -> ``[..., n_blocks * block_size, num_kv_heads, head_dim]``."""
    gathered = cache[block_ids.long()]
    return gathered.flatten(-4, -3)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked GQA attention in float32.

    q: ``[B, Q, Hq, D]``, k/v: ``[B, L, Hkv, D]``, allowed: bool ``[B, Q, L]`` (each row has at least
    one True). Returns float32 ``[B, Q, Hq, D]``.
    """
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    qf = q.float().reshape(batch, num_queries, num_kv_heads, group, head_dim)
    kf = k.float()
    # Masked positions may hold NaN: zero them in V (0 * NaN would poison the sum) and
    # overwrite their scores (masked_fill replaces NaN scores too).
    vf = v.float().masked_fill(~allowed.any(dim=1)[:, :, None, None], 0.0)
    scores = torch.einsum("bqhgd,blhd->bhgql", qf, kf) * scale
    scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgql,blhd->bqhgd", probs, vf)
    return out.reshape(batch, num_queries, num_q_heads, head_dim)


def paged_decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """One query token per sequence, attending to its whole context (its own K/V already cached).

    out, query: ``[batch, num_q_heads, head_dim]``; block_tables int32 ``[batch, max_blocks]``;
    seq_lens int32 ``[batch]`` (>= 1, includes the current token); scale: softmax scale
    (usually ``head_dim ** -0.5``). The whole batch is gathered into one padded tensor and
    attended at once.
    """
    batch = query.shape[0]
    if batch == 0:
        return
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    max_len = int(seq_lens.max())
    num_blocks = -(-max_len // block_size)
    positions = torch.arange(max_len, device=query.device)
    # Normally one group; huge batches of long contexts are split to bound the gathered copy.
    group = max(1, _SCORE_BUDGET // (max_len * num_kv_heads * head_dim))
    for first in range(0, batch, group):
        rows = slice(first, min(batch, first + group))
        block_ids = block_tables[rows, :num_blocks]
        k = _gather_context(key_cache, block_ids)[:, :max_len]
        v = _gather_context(value_cache, block_ids)[:, :max_len]
        allowed = (positions[None, :] < seq_lens[rows, None].to(positions.dtype))[:, None, :]
        result = _attend(query[rows, None], k, v, allowed, scale)
        out[rows] = result[:, 0].to(out.dtype)


def paged_prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """Causal attention for variable-length query chunks over cached contexts.

    out, query: ``[num_tokens, num_q_heads, head_dim]``, sequence b's queries are rows
    ``query_start_loc[b]:query_start_loc[b+1]`` (query_start_loc int32 ``[batch+1]``).
    seq_lens int32 ``[batch]``: total context of each sequence including its new tokens, whose
    K/V must already be in the cache. The i-th query of sequence b sits at position
    ``seq_lens[b] - q_len_b + i`` and attends to cached positions ``<=`` its own, so a chunk after
    a cached prefix (prefix caching, chunked prefill, recompute) reads that prefix through the
    block table.
    """
    block_size, num_q_heads = key_cache.shape[1], query.shape[1]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, context_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if not 0 < q_len <= context_len:
            raise ValueError(f"sequence {b}: {q_len} query tokens but a context of {context_len}")
        num_blocks = -(-context_len // block_size)
        block_ids = block_tables[b, :num_blocks]
        k = _gather_context(key_cache, block_ids)[None, :context_len]
        v = _gather_context(value_cache, block_ids)[None, :context_len]
        key_positions = torch.arange(context_len, device=query.device)
        chunk = max(1, min(_PREFILL_QUERY_CHUNK, _SCORE_BUDGET // (num_q_heads * context_len)))
        for chunk_start in range(0, q_len, chunk):
            chunk_end = min(q_len, chunk_start + chunk)
            query_positions = torch.arange(chunk_start, chunk_end, device=query.device) + (context_len - q_len)
            allowed = (key_positions[None, :] <= query_positions[:, None])[None]
            result = _attend(query[None, start + chunk_start : start + chunk_end], k, v, allowed, scale)
            out[start + chunk_start : start + chunk_end] = result[0].to(out.dtype)


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], pairs: torch.Tensor) -> None:
    """Copy whole blocks within each layer's caches (copy-on-write).

    key_caches, value_caches: one ``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer.
    pairs: int64 ``[num_pairs, 2]`` of (src block id, dst block id) on the caches' device. All
    sources are read before any destination is written; destinations must be distinct.
    """
    if pairs.numel() == 0:
        return
    src, dst = pairs[:, 0].long(), pairs[:, 1].long()
    for cache in (*key_caches, *value_caches):
        cache.index_copy_(0, dst, cache.index_select(0, src))


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, pairs: torch.Tensor) -> None:
    """Copy blocks between two caches, e.g. device -> host (swap out) or host -> device (swap in).

    src, dst: ``[num_blocks_*, block_size, num_kv_heads, head_dim]`` (any devices, same dtype).
    pairs: int64 ``[num_pairs, 2]`` of (src block id, dst block id), on the CPU.
    """
    if pairs.numel() == 0:
        return
    src_ids = pairs[:, 0].long().to(src.device)
    dst_ids = pairs[:, 1].long().to(dst.device)
    blocks = src.index_select(0, src_ids).to(dst.device, non_blocking=False)
    dst.index_copy_(0, dst_ids, blocks)
