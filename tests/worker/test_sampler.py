"""worker/sampler.py: greedy, seeded reproducibility, and sampling frequencies against softmax.

Every random draw here is seeded, so the frequency checks are deterministic (never flaky); their
thresholds are chi-square 0.1% quantiles, which a correct sampler passes for most seeds and a
sampler with the wrong distribution fails (20000 draws resolve differences of ~1%).
"""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import CHI2_999, CPU, chi_square, make_batch, sample

from shared.protocol import SamplingParams
from worker.sampler import Sampler
from worker.seeded_noise import gumbel_noise, mix32

NUM_DRAWS = 20000


def test_greedy_is_argmax():
    logits = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [SamplingParams(temperature=0.0)] * 7) == logits.argmax(-1).tolist()
    # A temperature this small is greedy too (dividing by it would overflow).
    assert sample(logits, [SamplingParams(temperature=1e-7)] * 7) == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy_seeded_or_not():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.3, top_k=1, seed=s) for s in (None, 5, None, 9, 11, None)]
    assert sample(logits, params, Sampler(CPU, seed=3)) == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [SamplingParams(temperature=t) for t in (0.0, 1.0, 0.0, 2.0)])
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_mix32_is_lowbias32():
    def reference(x: int) -> int:  # the published 32-bit C version, in Python integers
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_seeded_noise_is_a_function_of_its_words_only():
    words = torch.tensor([[7, 0, 0, 3], [7, 0, 1, 3], [7, 0, 0, 4], [8, 0, 0, 3], [7, 0, 0, 3]])
    noise = gumbel_noise(words, 1000)
    assert torch.equal(noise[0], noise[4]) and torch.equal(noise[0], gumbel_noise(words[:1], 1000)[0])
    assert not any(torch.equal(noise[0], noise[i]) for i in (1, 2, 3))
    assert torch.isfinite(noise).all()


def test_seeded_rows_reproduce_whatever_the_batch():
    gen = torch.Generator().manual_seed(3)
    target_logits = torch.randn(1000, generator=gen)
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def draw(logits, params, position, sampler_seed):
        output_indices = [0] * len(params)
        output_indices[position] = 1
        generated = [0] * len(params)
        generated[position] = 7
        return sample(logits, params, Sampler(CPU, seed=sampler_seed), output_indices=output_indices,
                      generated=generated)[position]

    alone = draw(target_logits[None], [target], 0, 0)
    others = torch.randn(5, 1000, generator=gen)
    for position in range(6):
        logits = torch.cat([others[:position], target_logits[None], others[position:]])
        params = [SamplingParams(temperature=t, seed=s, top_k=k)
                  for t, s, k in ((1.0, None, 0), (0.5, 7, 3), (0.0, None, 0), (1.0, 99, 0), (2.0, None, 10))]
        params.insert(position, target)
        # A different worker seed changes the unseeded rows only.
        assert draw(logits, params, position, position + 10) == alone


def test_seeded_randomness_depends_on_seed_output_and_token_index():
    flat = torch.zeros(1, 1000)  # uniform: the token is the noise's argmax

    def draw(seed, output_index, generated_index):
        return sample(flat, [SamplingParams(seed=seed)], output_indices=[output_index], generated=[generated_index])[0]

    assert len({draw(42, 0, i) for i in range(20)}) > 15  # varies along the generation
    assert draw(42, 0, 3) == draw(42, 0, 3)
    assert [draw(42, 0, i) for i in range(8)] != [draw(42, 1, i) for i in range(8)]  # n > 1 outputs differ
    assert [draw(42, 0, i) for i in range(8)] != [draw(43, 0, i) for i in range(8)]
    assert [draw(42, 0, i) for i in range(8)] != [draw(42 + 2**32, 0, i) for i in range(8)]  # high bits count
    assert draw(-5, 0, 0) == draw(-5, 0, 0)


def _counts(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double()


def _draws(logits: torch.Tensor, params: SamplingParams, seeded: bool, sampler_seed: int = 0) -> list[int]:
    """NUM_DRAWS samples of one distribution: unseeded rows of one batch (the worker generator),
    or one seeded row per generated-token index (the counter-based noise)."""
    batch = logits.expand(NUM_DRAWS, -1).contiguous()
    if seeded:
        params = SamplingParams(**{**_fields(params), "seed": 2024})
        return sample(batch, [params] * NUM_DRAWS, generated=list(range(NUM_DRAWS)))
    return sample(batch, [params] * NUM_DRAWS, Sampler(CPU, seed=sampler_seed))


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__struct_fields__}


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3, -0.4, 1.4])


def _renormalised(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


@pytest.mark.parametrize("seeded", [False, True], ids=["generator", "seeded"])
@pytest.mark.parametrize("case", ["temperature", "top_k", "top_p", "min_p"])
def test_sampling_frequencies_match_softmax(case, seeded):
    probs = torch.softmax(LOGITS.double() / 0.7, -1)
    order = probs.argsort(descending=True)
    if case == "temperature":
        params, keep = SamplingParams(temperature=0.7), torch.ones(8, dtype=torch.bool)
    elif case == "top_k":
        params, keep = SamplingParams(temperature=0.7, top_k=4), torch.zeros(8, dtype=torch.bool)
        keep[order[:4]] = True
    elif case == "top_p":
        params, keep = SamplingParams(temperature=0.7, top_p=0.8), torch.zeros(8, dtype=torch.bool)
        mass_before = probs[order].cumsum(0) - probs[order]
        keep[order[mass_before < 0.8]] = True  # the smallest set whose mass reaches 0.8
    else:
        params, keep = SamplingParams(temperature=0.7, min_p=0.2), probs >= 0.2 * probs.max()
    assert 1 < int(keep.sum()) < 8 or case == "temperature"  # the filter does cut, and leaves a choice
    expected = _renormalised(probs, keep)
    counts = _counts(_draws(LOGITS, params, seeded), 8)
    assert chi_square(counts, expected) < CHI2_999[int(keep.sum()) - 1]


def test_seeded_frequencies_across_seeds():
    """One draw per seed at the same token index: the seed alone must randomise well."""
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7])
    batch = logits.expand(NUM_DRAWS, -1).contiguous()
    tokens = sample(batch, [SamplingParams(seed=s) for s in range(NUM_DRAWS)])
    assert chi_square(_counts(tokens, 4), torch.softmax(logits.double(), -1)) < CHI2_999[3]


def test_large_vocabulary_rows_use_the_whole_distribution():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(200, generator=gen) * 3
    logits = base.expand(3000, -1).contiguous()
    order = torch.softmax(base, -1).argsort(descending=True)
    tokens = sample(logits, [SamplingParams(top_k=5)] * 3000)
    assert set(tokens) == set(order[:5].tolist())
    seeded = sample(logits, [SamplingParams(top_k=5, seed=11)] * 3000, generated=list(range(3000)))
    assert set(seeded) == set(order[:5].tolist())


def test_metadata_skips_unused_stages():
    _, meta = make_batch([SamplingParams(temperature=0.0), SamplingParams()], 100)
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.repetition_penalty is None and meta.min_tokens_stop_ids is None and meta.seed_words is None
    assert not meta.all_greedy and meta.unseeded_rows.tolist() == [1] and meta.penalty_rows is None
