"""Triton cache writes: ``reshape_and_cache`` (new K/V rows into their slots) and ``copy_blocks``
(copy-on-write of whole blocks, every layer in one launch).

Signatures, layouts and semantics are those of kernels/reference.py:

* caches ``[num_blocks, block_size, num_kv_heads, head_dim]``, unit stride on head_dim;
* ``slot = block_id * block_size + offset`` (int64, tokens); a negative slot is a padding token;
* copy pairs are (src block id, dst block id); every source is read before any destination is
  written, destinations are distinct.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import check_cache, interpreting, next_pow2


@triton.jit
def _reshape_and_cache_kernel(
    key, value, key_cache, value_cache, slot_mapping,
    stride_kt, stride_kh, stride_vt, stride_vh,  # key/value [num_tokens, num_kv_heads, head_dim], unit stride on d
    stride_cb, stride_co, stride_ch,  # cache strides: block, offset in block, kv head (elements)
    block_size, num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: all of its KV heads at once."""
    token = tl.program_id(0).to(tl.int64)  # token * stride may pass 2**31 in a large prefill step
    slot = tl.load(slot_mapping + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A negative slot (padding) writes nothing; the clamp keeps its addresses in bounds anyway.
    # (The scalar condition enters as a bound: the interpreter rejects `block & scalar` masks.)
    mask = (offs_h[:, None] < tl.where(slot >= 0, num_kv_heads, 0)) & (offs_d[None, :] < head_dim)
    safe_slot = tl.maximum(slot, 0)
    k = tl.load(key + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = (safe_slot // block_size) * stride_cb + (safe_slot % block_size) * stride_co
    dst += offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(key_cache + dst, k.to(key_cache.dtype.element_ty), mask=mask)
    tl.store(value_cache + dst, v.to(value_cache.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V row into its cache slot (see kernels.reference.reshape_and_cache).

    key, value: ``[num_tokens, num_kv_heads, head_dim]`` (any token/head strides, unit stride on
    head_dim; converted to the cache dtype); slot_mapping: int64 ``[num_tokens]``, negative = skip.
    """
    check_cache(key_cache, value_cache)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_size, num_kv_heads, head_dim,
        BLOCK_H=next_pow2(num_kv_heads), BLOCK_D=next_pow2(head_dim),
    )


@triton.jit
def _copy_blocks_kernel(src_ptrs, dst_ptrs, src_ids, dst_ids, elem_ref, block_numel, BLOCK: tl.constexpr):
    """Grid (pair, tensor, chunk): copy BLOCK elements of one block of one cache tensor.

    src_ptrs/dst_ptrs: int64 data pointers, one per cache tensor (K and V of every layer); they
    are equal for copy-on-write within a cache, and differ for the two-phase staged copy.
    elem_ref: any tensor of the caches' dtype (only its element type is used)."""
    pair = tl.program_id(0)
    tensor = tl.program_id(1)
    chunk = tl.program_id(2)
    elem = elem_ref.dtype.element_ty
    src_base = tl.load(src_ptrs + tensor).to(tl.pointer_type(elem))
    dst_base = tl.load(dst_ptrs + tensor).to(tl.pointer_type(elem))
    src_block = tl.load(src_ids + pair).to(tl.int64)
    dst_block = tl.load(dst_ids + pair).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    x = tl.load(src_base + src_block * block_numel + offs, mask=mask)
    tl.store(dst_base + dst_block * block_numel + offs, x, mask=mask)


def _pointers(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], pairs: torch.Tensor) -> None:
    """Copy whole blocks within each layer's caches (see kernels.reference.copy_blocks).

    pairs: int64 ``[num_pairs, 2]`` (src block id, dst block id) on the caches' device. All
    layers go in one launch through a table of data pointers (so every cache must be contiguous
    and share shape and dtype). If a destination is also a source, blocks are first staged in a
    scratch buffer so every source is read before any destination is written; checking that
    costs one device sync, acceptable because copy-on-write is rare (parallel sampling).

    Under the interpreter the pointer table holds host addresses, so it works for CPU caches only.
    """
    if pairs.numel() == 0:
        return
    caches = [*key_caches, *value_caches]
    first = caches[0]
    for cache in caches:
        if cache.shape != first.shape or cache.dtype != first.dtype or not cache.is_contiguous():
            raise ValueError("copy_blocks needs contiguous caches of one shape and dtype")
    if interpreting() and first.device.type != "cpu":
        raise RuntimeError("copy_blocks under TRITON_INTERPRET works on CPU caches only")
    block_numel = first[0].numel()
    block = min(4096, next_pow2(block_numel))
    src_ids, dst_ids = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    num_pairs = src_ids.shape[0]
    grid = (num_pairs, len(caches), triton.cdiv(block_numel, block))
    cache_ptrs = _pointers(caches, first.device)
    if not bool(torch.isin(dst_ids, src_ids).any()):
        _copy_blocks_kernel[grid](cache_ptrs, cache_ptrs, src_ids, dst_ids, first, block_numel, BLOCK=block)
        return
    staging = torch.empty((len(caches), num_pairs, *first.shape[1:]), dtype=first.dtype, device=first.device)
    staging_ptrs = _pointers(list(staging.unbind(0)), first.device)
    order = torch.arange(num_pairs, dtype=src_ids.dtype, device=first.device)
    _copy_blocks_kernel[grid](cache_ptrs, staging_ptrs, src_ids, order, first, block_numel, BLOCK=block)
    _copy_blocks_kernel[grid](staging_ptrs, cache_ptrs, order, dst_ids, first, block_numel, BLOCK=block)
