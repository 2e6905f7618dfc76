"""kernels/cpu_kernels.py (the C++ paged decode for CPUs) against kernels/reference.py.

Unused cache slots and the output are poisoned with NaN (the kernel must never read past a
sequence's length), block tables are shuffled, contexts are not multiples of the block size nor
of the vector width. Every instruction set the build has (AVX-512, AVX2, plain C++: the module's
`compiled_lanes()`) runs every case, whichever the default picks on this machine.
The build must succeed here: CI machines have g++ and ninja, so a fallback would hide a defect.
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_kernels, reference


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.load() is not None, cpu_kernels.error()


def _lanes():
    module = cpu_kernels.load()
    return module.compiled_lanes() if module is not None else [1]


def _problem(seq_lens, block_size, num_q_heads, num_kv_heads, head_dim, seed, query_scale=1.0):
    """NaN everywhere but the contexts' slots; each sequence's blocks drawn from a shuffled pool."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 4
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    for b, (n, nb) in enumerate(zip(seq_lens, blocks)):
        ids, perm = perm[:nb], perm[nb:]
        tables[b, :nb] = torch.tensor(ids)
        offsets = torch.arange(nb * block_size) % block_size
        slots = torch.tensor(ids).repeat_interleave(block_size) * block_size + offsets
        flat_k, flat_v = key_cache.view(-1, num_kv_heads, head_dim), value_cache.view(-1, num_kv_heads, head_dim)
        flat_k[slots[:n]] = torch.randn(n, num_kv_heads, head_dim, generator=gen)  # only the context holds numbers
        flat_v[slots[:n]] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen) * query_scale
    return query, key_cache, value_cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


def _check(query, key_cache, value_cache, tables, lens, lanes=None, scale=None):
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    expected, got = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    reference.paged_decode_attention(expected, query, key_cache, value_cache, tables, lens, scale)
    if lanes is None:
        cpu_kernels.paged_decode_attention(got, query, key_cache, value_cache, tables, lens, scale)
    else:
        cpu_kernels.load().paged_decode_f32(got, query, key_cache, value_cache, tables, lens, scale, lanes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim,num_q_heads,num_kv_heads", [(64, 9, 3), (128, 8, 8), (64, 32, 8), (128, 8, 1)])
def test_decode_equals_reference(block_size, head_dim, num_q_heads, num_kv_heads):
    seq_lens = [1, block_size, block_size + 1, 3 * block_size - 1, 157]
    problem = _problem(seq_lens, block_size, num_q_heads, num_kv_heads, head_dim,
                       seed=block_size * 1000 + head_dim + num_q_heads)
    _check(*problem)


@pytest.mark.parametrize("lanes", _lanes())
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (64, 3), (128, 4), (64, 8), (80, 3)])
def test_every_instruction_set(lanes, block_size, head_dim, group):
    """Lengths around the vector widths (8, 16) and block sizes, one long context, GQA groups 1-8."""
    seq_lens = [1, 7, 8, 9, 15, 16, 17, 31, 33, block_size - 1, block_size + 1, 1000]
    problem = _problem(seq_lens, block_size, 2 * group, 2, head_dim, seed=lanes + block_size + head_dim + group)
    _check(*problem, lanes=lanes)


@pytest.mark.parametrize("lanes", _lanes())
def test_sharp_softmax(lanes):
    """Scores spread over hundreds: exp's whole range, probabilities that underflow to 0."""
    problem = _problem([5, 40, 300, 777], 16, 9, 3, 64, seed=11, query_scale=30.0)
    _check(*problem, lanes=lanes)


@pytest.mark.parametrize("lanes", _lanes())
def test_exp_within_two_ulp(lanes):
    """The softmax's polynomial exp against float64, over the range softmax uses (x <= 0) and
    beyond; below -87.5 (where 2^n would leave float's normal range) it returns exactly 0."""
    x = torch.cat([torch.linspace(-87.0, 88.0, 160_000), torch.randn(16_000) * 3, torch.tensor([0.0] * 16)])
    got, expected = cpu_kernels.load().exp_f32(x, lanes).double(), x.double().exp()
    assert ((got - expected).abs() / expected).max().item() < 2.5e-7  # float's ulp is 1.2e-7 relative at most
    low = torch.tensor([-87.6, -88.0, -100.0, -1e30, float("-inf")] + [-90.0] * 11)
    assert torch.equal(cpu_kernels.load().exp_f32(low, lanes), torch.zeros(16))


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_work_split_across_threads(threads):
    """Threads get contiguous ranges of (sequence, KV head) of about equal token count, so a
    sequence's heads may be split between threads; lengths differ by 100x."""
    gen = torch.Generator().manual_seed(threads)
    seq_lens = torch.randint(1, 400, (23,), generator=gen).tolist() + [2000, 3]
    problem = _problem(seq_lens, 16, 9, 3, 64, seed=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(*problem)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("head_dim", [20, 40, 72])
def test_head_dim_not_a_multiple_of_the_widest_vector(head_dim):
    """The default falls back to the widest instruction set whose width divides head_dim."""
    _check(*_problem([1, 19, 100], 16, 6, 2, head_dim, seed=head_dim))


def test_strided_query_rows_and_int64_tables():
    """The backend passes views (rows of a mixed step) and the metadata's own dtypes."""
    gen = torch.Generator().manual_seed(7)
    key_cache, value_cache = torch.randn(12, 16, 2, 64, generator=gen), torch.randn(12, 16, 2, 64, generator=gen)
    tables = torch.randperm(12, generator=gen)[:8].view(2, 4)
    lens = torch.tensor([50, 64])
    query = torch.randn(2, 8, 2 * 64, generator=gen)[:, :, :64]  # head_dim innermost, rows strided
    expected, got = torch.empty(2, 8, 64), torch.empty(2, 8, 64)
    reference.paged_decode_attention(expected, query, key_cache, value_cache, tables, lens, 0.125)
    cpu_kernels.paged_decode_attention(got, query, key_cache, value_cache, tables, lens, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cpu_kernels.supports(query, key_cache)
    assert cpu_kernels.supports(query.bfloat16(), key_cache.bfloat16())
    assert not cpu_kernels.supports(query.half(), key_cache.half())
    assert not cpu_kernels.supports(query, key_cache.bfloat16())  # the query in the cache's dtype


@pytest.mark.parametrize("lanes", _lanes())
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("head_dim,group", [(64, 3), (128, 4), (80, 1)])
def test_bfloat16_cache(lanes, block_size, head_dim, group):
    """A bfloat16 cache is widened as it is read, everything else in float32: the result equals
    the float32 reference on the same (bf16-valued) numbers to float32 rounding. NaN slots stay NaN
    in bf16, so reads past a length would still show."""
    seq_lens = [1, 7, 16, 17, 33, block_size + 1, 300]
    query, key_cache, value_cache, tables, lens = _problem(seq_lens, block_size, 2 * group, 2, head_dim,
                                                           seed=lanes + block_size + head_dim)
    key_cache, value_cache, query = key_cache.bfloat16(), value_cache.bfloat16(), query.bfloat16().float()
    scale = head_dim ** -0.5
    expected, got = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    reference.paged_decode_attention(expected, query, key_cache.float(), value_cache.float(), tables, lens, scale)
    cpu_kernels.load().paged_decode_f32(got, query, key_cache, value_cache, tables, lens, scale, lanes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_query_and_out_through_the_wrapper():
    """The backend's call in a bfloat16 model: bf16 query, cache and out; the result is the
    float32 one rounded to bf16."""
    query, key_cache, value_cache, tables, lens = _problem([3, 40, 129], 16, 8, 2, 64, seed=5)
    query, key_cache, value_cache = query.bfloat16(), key_cache.bfloat16(), value_cache.bfloat16()
    expected = torch.empty(query.shape)
    reference.paged_decode_attention(expected, query.float(), key_cache.float(), value_cache.float(), tables, lens,
                                     0.125)
    out = torch.full_like(query, float("nan"))
    cpu_kernels.paged_decode_attention(out, query, key_cache, value_cache, tables, lens, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), rtol=8e-3, atol=1e-5)  # bf16's rounding, no more


def test_rejects_what_it_would_read_out_of_bounds():
    query, key_cache, value_cache, tables, lens = _problem([20, 5], 16, 4, 2, 64, seed=3)
    out = torch.empty_like(query)
    module = cpu_kernels.load()
    bad = tables.clone()
    bad[0, 1] = key_cache.shape[0]  # a block id past the cache
    with pytest.raises(RuntimeError, match="block id out of range"):
        module.paged_decode_f32(out, query, key_cache, value_cache, bad, lens, 0.125)
    with pytest.raises(RuntimeError, match="seq_len out of range"):
        too_long = torch.tensor([33, 5], dtype=torch.int32)  # 3 blocks of 16, the table has 2
        module.paged_decode_f32(out, query, key_cache, value_cache, tables, too_long, 0.125)
    with pytest.raises(RuntimeError, match="lanes"):
        module.paged_decode_f32(out, query, key_cache, value_cache, tables, lens, 0.125, 3)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 caches"):
        module.paged_decode_f32(out, query, key_cache.half(), value_cache.half(), tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="both the same"):
        module.paged_decode_f32(out, query, key_cache.bfloat16(), value_cache, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="float32 query and out"):
        module.paged_decode_f32(out.bfloat16(), query, key_cache, value_cache, tables, lens, 0.125)
