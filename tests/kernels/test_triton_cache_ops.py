"""Triton reshape_and_cache and copy_blocks, and swap_ops.swap_blocks, against kernels/reference.py.

Caches start NaN-filled (or random), so every slot a kernel must leave alone is compared too:
the results must be bit-identical to the reference's (these ops only move bytes).
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference, swap_ops, triton_cache_ops
from paged_inputs import DEVICE, NAN

HAS_CUDA = torch.cuda.is_available()


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-equal, NaN included (they are where nothing was written)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_reshape_and_cache(block_size, head_dim):
    gen = torch.Generator().manual_seed(block_size + head_dim)
    num_blocks, num_kv_heads, num_tokens = 6, 3, 13
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # K and V as strided views of one fused projection, as the model produces them.
    fused = torch.randn(num_tokens, 2, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    key, value = fused[:, 0], fused[:, 1]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1  # padding tokens: written nowhere
    slots = slots.to(DEVICE)
    expected_k, expected_v = torch.full(shape, NAN, device=DEVICE), torch.full(shape, NAN, device=DEVICE)
    key_cache, value_cache = expected_k.clone(), expected_v.clone()
    reference.reshape_and_cache(key, value, expected_k, expected_v, slots)
    triton_cache_ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    same(key_cache, expected_k)
    same(value_cache, expected_v)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_reshape_and_cache_converts_to_cache_dtype(cache_dtype):
    if cache_dtype == torch.bfloat16 and not HAS_CUDA:
        # Measured: the interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest even).
        pytest.skip("float32 -> bfloat16 conversion is checked on CUDA only (the interpreter truncates)")
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(5, 2, 64, generator=gen).to(DEVICE)
    value = torch.randn(5, 2, 64, generator=gen).to(DEVICE)
    slots = torch.tensor([9, 0, 31, -1, 17], device=DEVICE)
    expected = [torch.zeros(4, 8, 2, 64, dtype=cache_dtype, device=DEVICE) for _ in range(2)]
    actual = [t.clone() for t in expected]
    reference.reshape_and_cache(key, value, *expected, slots)
    triton_cache_ops.reshape_and_cache(key, value, *actual, slots)
    same(actual[0], expected[0])
    same(actual[1], expected[1])


COPY_PAIRS = {
    "disjoint": [[1, 4], [3, 0], [6, 2]],
    "chain": [[1, 2], [2, 5], [5, 7]],  # a destination is also a source: sources must be read first
    "swap_two": [[0, 3], [3, 0]],
}


@pytest.mark.parametrize("kind", sorted(COPY_PAIRS))
def test_copy_blocks(kind):
    gen = torch.Generator().manual_seed(11)
    num_layers, shape = 3, (8, 16, 2, 64)
    caches = [torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2 * num_layers)]
    caches[0][5, 3] = NAN  # NaN moves like any other value
    pairs = torch.tensor(COPY_PAIRS[kind], dtype=torch.int64, device=DEVICE)
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected[:num_layers], expected[num_layers:], pairs)
    triton_cache_ops.copy_blocks(caches[:num_layers], caches[num_layers:], pairs)
    for a, b in zip(caches, expected):
        same(a, b)


def test_copy_blocks_empty_is_a_no_op():
    cache = torch.randn(4, 8, 1, 64, device=DEVICE)
    before = cache.clone()
    triton_cache_ops.copy_blocks([cache], [cache.clone()], torch.empty((0, 2), dtype=torch.int64, device=DEVICE))
    same(cache, before)


def test_block_runs_coalesce_consecutive_ids():
    assert swap_ops.block_runs([(4, 10), (5, 11), (6, 12), (9, 13), (10, 14), (2, 0)]) == [
        (4, 10, 3), (9, 13, 2), (2, 0, 1)]
    assert swap_ops.block_runs([]) == []


SWAP_PAIRS = {
    "runs": [[2, 0], [3, 1], [4, 2], [7, 5]],
    "scattered": [[6, 3], [1, 0], [4, 6]],
}


@pytest.mark.parametrize("kind", sorted(SWAP_PAIRS))
@pytest.mark.parametrize("direction", ["out", "in"])
def test_swap_blocks(kind, direction):
    """Device <-> host when CUDA is present (pinned host side), host <-> host otherwise."""
    gen = torch.Generator().manual_seed(13)
    device_cache = torch.randn(8, 16, 2, 64, generator=gen).to(DEVICE)
    host_cache = torch.randn(7, 16, 2, 64, generator=gen).pin_memory() if HAS_CUDA else \
        torch.randn(7, 16, 2, 64, generator=gen)
    src, dst = (device_cache, host_cache) if direction == "out" else (host_cache, device_cache)
    pairs = torch.tensor(SWAP_PAIRS[kind], dtype=torch.int64)
    if direction == "in":
        pairs = pairs.flip(1)
    expected = dst.clone()
    reference.swap_blocks(src, expected, pairs)
    swap_ops.swap_blocks(src, dst, pairs)
    if HAS_CUDA:
        torch.cuda.synchronize()
    same(dst.cpu(), expected.cpu())


def test_swap_blocks_within_one_tensor_reads_sources_first():
    cache = torch.randn(4, 8, 1, 64)
    expected = cache.clone()
    pairs = torch.tensor([[0, 1], [1, 0]])
    reference.swap_blocks(expected, expected, pairs)
    swap_ops.swap_blocks(cache, cache, pairs)
    same(cache, expected)
