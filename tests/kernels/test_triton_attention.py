"""Triton decode and prefill/extend attention against kernels/reference.py on fresh random inputs.

Every case: NaN-filled caches outside each sequence's context, shuffled block tables whose
padding points at foreign blocks, contexts that are not multiples of the block size, mixed
lengths in one batch, outputs poisoned with NaN before the call. Without CUDA these run in
Triton's interpreter (tests/kernels/conftest.py) in float32; with CUDA, natively, plus fp16/bf16.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import reference, triton_decode, triton_prefill
from paged_inputs import DEVICE, int32, paged_cache, poisoned_like

HAS_CUDA = torch.cuda.is_available()
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
NUM_KV_HEADS = 2

# (block_size, GQA group, head_dim): every block size x every group, head dims alternating,
# plus a head dim that is not a power of two (masked lanes).
SHAPES = [(bs, g, (64, 128)[i % 2]) for i, (bs, g) in enumerate(itertools.product((8, 16, 32), (1, 3, 4, 8)))]
SHAPES.append((16, 4, 96))
SPLITS = [None, 2, 4, 3]  # None: the heuristic (1 under the interpreter); 3: not a power of two
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="fp16/bf16 kernels are checked on CUDA only")


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "NaN in the output: an unwritten row or a read of a poisoned slot"
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL[dtype], rtol=ATOL[dtype])


def decode_case(block_size, group, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    contexts = [1, 2 * block_size + 3, 5 * block_size - 1, 77]
    key_cache, value_cache, tables = paged_cache(contexts, block_size, NUM_KV_HEADS, head_dim, dtype, gen)
    query = torch.randn(len(contexts), NUM_KV_HEADS * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    return query, key_cache, value_cache, tables, int32(contexts)


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_decode_matches_reference(case):
    block_size, group, head_dim = SHAPES[case]
    num_splits = SPLITS[case % len(SPLITS)]
    query, key_cache, value_cache, tables, seq_lens = decode_case(block_size, group, head_dim, torch.float32, case)
    expected, out = poisoned_like(query), poisoned_like(query)
    scale = head_dim ** -0.5
    reference.paged_decode_attention(expected, query, key_cache, value_cache, tables, seq_lens, scale)
    triton_decode.paged_decode_attention(out, query, key_cache, value_cache, tables, seq_lens, scale,
                                         num_splits=num_splits)
    close(out, expected, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 4, 8])
def test_decode_mixed_step_reads_rows_in_place(num_splits):
    """query_start_loc mode: one-token chunks are computed at their flat rows, other rows untouched."""
    block_size, group, head_dim = 8, 4, 64
    query, key_cache, value_cache, tables, seq_lens = decode_case(block_size, group, head_dim, torch.float32, 7)
    q_lens = [1, 3, 1, 2]  # sequences 1 and 3 are prefill chunks: not the decode kernel's
    starts = [0, *itertools.accumulate(q_lens)]
    flat = torch.randn(starts[-1], *query.shape[1:]).to(DEVICE)
    decode_rows = [starts[b] for b in (0, 2)]
    flat[decode_rows] = query[[0, 2]]
    out = poisoned_like(flat)
    triton_decode.paged_decode_attention(out, flat, key_cache, value_cache, tables, seq_lens, head_dim ** -0.5,
                                         num_splits=num_splits, query_start_loc=int32(starts))
    expected = poisoned_like(query[[0, 2]])
    reference.paged_decode_attention(expected, query[[0, 2]], key_cache, value_cache, tables[[0, 2]],
                                     seq_lens[[0, 2]], head_dim ** -0.5)
    close(out[decode_rows], expected, torch.float32)
    others = [r for r in range(starts[-1]) if r not in decode_rows]
    assert out[others].isnan().all(), "rows of prefill chunks must be left to the prefill kernel"


def prefill_case(block_size, group, head_dim, dtype, seed, strided):
    """(context, query tokens) per sequence: a fresh prompt, a chunk after a cached prefix, a
    one-token prompt, a one-token chunk, and a sequence with nothing to compute this step."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [(2 * block_size + 3, 2 * block_size + 3), (5 * block_size - 1, 7), (1, 1), (block_size + 1, 1),
              (20, 0)]
    contexts = [c for c, _ in chunks]
    key_cache, value_cache, tables = paged_cache(contexts, block_size, NUM_KV_HEADS, head_dim, dtype, gen)
    num_tokens, num_q_heads = sum(q for _, q in chunks), NUM_KV_HEADS * group
    if strided:  # a view with gaps between heads, as a slice of a fused QKV projection would be
        query = torch.randn(num_tokens, num_q_heads, head_dim + 8, generator=gen)[..., :head_dim]
    else:
        query = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen)
    query = query.to(dtype).to(DEVICE)
    starts = int32([0, *itertools.accumulate(q for _, q in chunks)])
    return query, key_cache, value_cache, tables, starts, int32(contexts)


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_prefill_matches_reference(case):
    block_size, group, head_dim = SHAPES[case]
    query, key_cache, value_cache, tables, starts, seq_lens = prefill_case(
        block_size, group, head_dim, torch.float32, 100 + case, strided=case % 2 == 1)
    expected, out = poisoned_like(query), poisoned_like(query)
    scale = head_dim ** -0.5
    reference.paged_prefill_attention(expected, query, key_cache, value_cache, tables, starts, seq_lens, scale)
    triton_prefill.paged_prefill_attention(out, query, key_cache, value_cache, tables, starts, seq_lens, scale)
    close(out, expected, torch.float32)


def test_prefill_long_chunk_spans_many_tiles():
    """A chunk longer than several query and key tiles after a prefix of several key tiles."""
    gen = torch.Generator().manual_seed(5)
    key_cache, value_cache, tables = paged_cache([90], 16, 1, 64, torch.float32, gen)
    query = torch.randn(70, 3, 64, generator=gen).to(DEVICE)
    starts, seq_lens = int32([0, 70]), int32([90])
    expected, out = poisoned_like(query), poisoned_like(query)
    reference.paged_prefill_attention(expected, query, key_cache, value_cache, tables, starts, seq_lens, 0.125)
    triton_prefill.paged_prefill_attention(out, query, key_cache, value_cache, tables, starts, seq_lens, 0.125,
                                           max_query_len=70)
    close(out, expected, torch.float32)


def test_prefill_skip_decodes_leaves_one_token_chunks():
    query, key_cache, value_cache, tables, starts, seq_lens = prefill_case(8, 3, 64, torch.float32, 9, False)
    expected, out = poisoned_like(query), poisoned_like(query)
    reference.paged_prefill_attention(expected, query, key_cache, value_cache, tables, starts, seq_lens, 0.125)
    triton_prefill.paged_prefill_attention(out, query, key_cache, value_cache, tables, starts, seq_lens, 0.125,
                                           skip_decodes=True)
    q_lens = (starts[1:] - starts[:-1]).tolist()
    one_token_rows = [int(starts[b]) for b, n in enumerate(q_lens) if n == 1]
    assert one_token_rows and out[one_token_rows].isnan().all()
    rest = [r for r in range(query.shape[0]) if r not in one_token_rows]
    close(out[rest], expected[rest], torch.float32)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [0, 5, 11])
def test_decode_half_precision(dtype, case):
    block_size, group, head_dim = SHAPES[case]
    query, key_cache, value_cache, tables, seq_lens = decode_case(block_size, group, head_dim, dtype, case)
    expected, out = poisoned_like(query), poisoned_like(query)
    reference.paged_decode_attention(expected, query, key_cache, value_cache, tables, seq_lens, head_dim ** -0.5)
    for num_splits in (None, 1, 4):
        out.fill_(float("nan"))
        triton_decode.paged_decode_attention(out, query, key_cache, value_cache, tables, seq_lens,
                                             head_dim ** -0.5, num_splits=num_splits)
        close(out, expected, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [0, 5, 11])
def test_prefill_half_precision(dtype, case):
    block_size, group, head_dim = SHAPES[case]
    query, key_cache, value_cache, tables, starts, seq_lens = prefill_case(
        block_size, group, head_dim, dtype, case, strided=True)
    expected, out = poisoned_like(query), poisoned_like(query)
    reference.paged_prefill_attention(expected, query, key_cache, value_cache, tables, starts, seq_lens, 0.1)
    triton_prefill.paged_prefill_attention(out, query, key_cache, value_cache, tables, starts, seq_lens, 0.1)
    close(out, expected, dtype)


def test_choose_num_splits_fills_an_h100(monkeypatch):
    """Two waves over 132 SMs, >= 256 tokens a split, powers of two up to 32; 1 when batch x
    kv heads already fills the GPU."""
    monkeypatch.setattr(triton_decode, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert triton_decode.choose_num_splits(1, 8, 16384, cuda) == 32
    assert triton_decode.choose_num_splits(4, 8, 512, cuda) == 2
    assert triton_decode.choose_num_splits(4, 8, 4096, cuda) == 8
    assert triton_decode.choose_num_splits(64, 8, 4096, cuda) == 1
    assert triton_decode.choose_num_splits(1, 8, 100, cuda) == 1
