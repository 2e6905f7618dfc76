"""The Triton attention backend: the same two calls as `TorchAttentionBackend`, on kernels/triton_*.

Meant for CUDA; on CPU it runs only under ``TRITON_INTERPRET=1`` (tests), slowly.

A step is one of three kinds, told apart by `AttentionMetadata`:

* decode only (every sequence has one token): one decode launch (plus its split reduce);
* otherwise the flat token batch goes to the prefill kernel, which skips one-token chunks, and,
  unless every chunk is longer than one token, to the decode kernel too, which reads each
  one-token chunk's row in place through ``query_start_loc``. No rows are gathered or scattered;
  the one host sync of a step with prefills is the prefill grid's longest chunk.

Copy-on-write lives in kernels/triton_cache_ops.py, exposed here as `copy_blocks` for the
worker's step loop; swaps go through kernels/swap_ops.py for every backend (worker/model_runner.py).
"""

from __future__ import annotations

import torch

from kernels import triton_cache_ops, triton_decode, triton_prefill
from worker.attention import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def write_kv(self, key, value, key_cache, value_cache, meta: AttentionMetadata) -> None:
        """key, value ``[num_tokens, num_kv_heads, head_dim]`` into their slots (meta.slot_mapping)."""
        triton_cache_ops.reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping)

    def attend(self, query, key_cache, value_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """query ``[num_tokens, num_q_heads, head_dim]`` -> output of the same shape and dtype."""
        out = torch.empty_like(query)
        if query.shape[0] == 0:
            return out
        if meta.decode_only:
            triton_decode.paged_decode_attention(out, query, key_cache, value_cache, meta.block_tables,
                                                 meta.seq_lens, scale)
            return out
        query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        # One sync for both facts: the prefill grid's height and whether any decode rides along.
        max_query_len, num_decodes = (int(x) for x in torch.stack(
            [query_lens.max(), (query_lens == 1).sum()]).tolist())
        triton_prefill.paged_prefill_attention(out, query, key_cache, value_cache, meta.block_tables,
                                               meta.query_start_loc, meta.seq_lens, scale,
                                               max_query_len=max_query_len, skip_decodes=num_decodes > 0)
        if num_decodes:
            triton_decode.paged_decode_attention(out, query, key_cache, value_cache, meta.block_tables,
                                                 meta.seq_lens, scale, query_start_loc=meta.query_start_loc)
        return out

    @staticmethod
    def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], pairs: torch.Tensor) -> None:
        triton_cache_ops.copy_blocks(key_caches, value_caches, pairs)
