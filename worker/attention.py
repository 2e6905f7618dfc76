"""Attention metadata of one step, and the backend that reads and writes the paged KV cache.

The model calls only `AttentionBackend.write_kv` (or `rope_write_kv`, where a backend fuses RoPE
into the cache write) and `AttentionBackend.attend`, so a Triton backend with the same methods can
replace `TorchAttentionBackend` without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import cpu_kernels, cpu_layer_ops, reference, sdpa_paged


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the KV cache and what each one attends to.

    Tokens of the step are flat: sequence b owns rows ``query_start_loc[b]:query_start_loc[b+1]``.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: block_id * block_size + offset
    block_tables: torch.Tensor  # int32 [batch, max_blocks]; entries past a sequence's blocks: any valid id, unread
    seq_lens: torch.Tensor  # int32 [batch]: context length in tokens, including this step's
    query_start_loc: torch.Tensor  # int32 [batch + 1]: prefix sums of tokens per sequence
    decode_only: bool  # every sequence has exactly one token this step


class AttentionBackend:
    """Interface: ``write_kv`` (or ``rope_write_kv`` where it returns a query) then ``attend``,
    once per layer per step."""

    name = "abstract"

    def write_kv(self, key, value, key_cache, value_cache, meta: AttentionMetadata) -> None:
        raise NotImplementedError

    def attend(self, query, key_cache, value_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def rope_write_kv(self, qkv, cos, sin, num_heads: int, num_kv_heads: int, key_cache, value_cache,
                      meta: AttentionMetadata) -> torch.Tensor | None:
        """In place of the model's RoPE and ``write_kv``, where the backend has a fused op: rotate
        q and k of the fused projection ``qkv`` (cos/sin from the model's rope_tables), write K/V,
        return the query ``[num_tokens, num_heads, head_dim]``. None: no fused op for these inputs
        (the model then does both itself)."""
        return None


class TorchAttentionBackend(AttentionBackend):
    """torch's fused SDPA over the paged cache (kernels/sdpa_paged.py, tested against
    kernels/reference.py): runs anywhere.

    `write_kv` keeps the step's own K/V rows until `attend`, so a prefill with no cached prefix
    attends to them directly rather than gathering them back from the cache.
    """

    name = "torch"

    def __init__(self, cpu_kernel: bool = True):
        """`cpu_kernel`: decode float32 and bfloat16 CPU rows with kernels/cpu_kernels.py (built here, once per
        machine, if it can be); the SDPA path otherwise."""
        self._step_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._causal_rows: tuple[AttentionMetadata, torch.Tensor, torch.Tensor] | None = None
        self.cpu_kernel = cpu_kernel and cpu_kernels.load() is not None

    def _decode(self, out, query, key_cache, value_cache, block_tables, seq_lens, scale: float) -> None:
        if self.cpu_kernel and cpu_kernels.supports(query, key_cache):
            cpu_kernels.paged_decode_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale)
        else:
            sdpa_paged.paged_decode_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale)

    def write_kv(self, key, value, key_cache, value_cache, meta: AttentionMetadata) -> None:
        reference.reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        self._step_kv = (key, value)

    def rope_write_kv(self, qkv, cos, sin, num_heads: int, num_kv_heads: int, key_cache, value_cache,
                      meta: AttentionMetadata) -> torch.Tensor | None:
        if not (self.cpu_kernel and cpu_layer_ops.applies(qkv, cos, sin, key_cache) and key_cache.is_contiguous()):
            return None
        # No step K/V kept for `attend`: wherever this applies, `attend` reads the cache through the
        # decode kernel (cpu_kernels.supports holds for the same query and cache).
        return cpu_layer_ops.rope_write_kv(qkv, cos, sin, num_heads, key_cache, value_cache, meta.slot_mapping)

    def attend(self, query, key_cache, value_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """query ``[num_tokens, num_q_heads, head_dim]`` -> output of the same shape and dtype."""
        (key, value), self._step_kv = self._step_kv or (None, None), None
        out = torch.empty_like(query)
        if meta.decode_only:
            self._decode(out, query, key_cache, value_cache, meta.block_tables, meta.seq_lens, scale)
            return out
        if self.cpu_kernel and cpu_kernels.supports(query, key_cache):
            # Every token as a decode row over its own causal context (its K/V are in the cache
            # already): a row's context stays in L2. On the 2-core CPU a whole prefill step of one
            # bfloat16 prompt took 62 / 468 / 1310 ms at 185 / 1000 / 2000 tokens, against SDPA's
            # flash attention 80 / 583 / 1588 ms (float32: 109 vs 124 ms at 185, even at 2000).
            if self._causal_rows is None or self._causal_rows[0] is not meta:  # once per step, not per layer
                self._causal_rows = (meta, *causal_rows(meta))
            _, tables, lens = self._causal_rows
            cpu_kernels.paged_decode_attention(out, query, key_cache, value_cache, tables, lens, scale)
            return out
        # A mixed step: one-token sequences go through the batched decode path, so a long
        # prefill does not make every decode in its step loop in Python.
        query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        is_decode = query_lens == 1
        if not bool(is_decode.any()):
            sdpa_paged.paged_prefill_attention(out, query, key_cache, value_cache, meta.block_tables,
                                               meta.query_start_loc, meta.seq_lens, scale, key, value)
            return out
        token_is_decode = is_decode.repeat_interleave(query_lens)
        decode_out = torch.empty_like(query[token_is_decode])
        self._decode(decode_out, query[token_is_decode], key_cache, value_cache, meta.block_tables[is_decode],
                     meta.seq_lens[is_decode], scale)
        out[token_is_decode] = decode_out
        is_prefill = ~is_decode
        prefill_start_loc = torch.zeros_like(meta.query_start_loc[: int(is_prefill.sum()) + 1])
        prefill_start_loc[1:] = query_lens[is_prefill].cumsum(0)
        prefill_rows = ~token_is_decode
        prefill_out = torch.empty_like(query[prefill_rows])
        sdpa_paged.paged_prefill_attention(prefill_out, query[prefill_rows], key_cache, value_cache,
                                           meta.block_tables[is_prefill], prefill_start_loc,
                                           meta.seq_lens[is_prefill], scale,
                                           None if key is None else key[prefill_rows],
                                           None if value is None else value[prefill_rows])
        out[prefill_rows] = prefill_out
        return out


def causal_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token of the step as a decode row: (its sequence's block table row ``[num_tokens,
    max_blocks]``, its context length int32 ``[num_tokens]``: its position + 1)."""
    starts = meta.query_start_loc.long()
    query_lens = starts[1:] - starts[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens), device=starts.device), query_lens)
    index_in_seq = torch.arange(len(seq_of_token), device=starts.device) - starts[seq_of_token]
    lens = meta.seq_lens.long()[seq_of_token] - query_lens[seq_of_token] + index_in_seq + 1
    return meta.block_tables.index_select(0, seq_of_token), lens.to(torch.int32)


def get_attention_backend(name: str = "torch", device: torch.device | str | None = None) -> AttentionBackend:
    """``torch``, ``triton``, or ``auto``: triton on CUDA, torch elsewhere (``device`` None: CPU).

    Triton on a CPU device only works in Triton's interpreter (``TRITON_INTERPRET=1``, tests);
    that is checked when ``device`` is given. Triton is imported only here, so the torch backend
    works where triton is not installed.
    """
    if name == "auto":
        name = "triton" if device is not None and torch.device(device).type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend(cpu_kernel=device is None or torch.device(device).type == "cpu")
    if name == "triton":
        from kernels.triton_utils import interpreting

        if device is not None and torch.device(device).type != "cuda" and not interpreting():
            raise ValueError(f"attention backend 'triton' needs a CUDA device (got {device}) "
                             "or TRITON_INTERPRET=1 set before triton is imported")
        from worker.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (have: auto, torch, triton)")
