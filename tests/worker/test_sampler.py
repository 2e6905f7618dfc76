"""worker/sampler.py: greedy, top-k/top-p sets, seeded reproducibility, sampling frequencies.

Every random draw here is seeded, so frequency checks are deterministic (never flaky); their
thresholds are the chi-square 0.1% quantiles, which a correct sampler passes for most seeds.
"""

from __future__ import annotations

import torch

from shared.protocol import SamplingParams
from worker.sampler import RowSampling, Sampler, seeded_row_key

CPU = torch.device("cpu")
CHI2_999 = {3: 16.27, 5: 20.52, 7: 24.32}  # chi-square 0.999 quantiles by degrees of freedom


def rows(n: int, **params) -> list[RowSampling]:
    return [RowSampling(SamplingParams(**params))] * n


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax():
    logits = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    assert Sampler(CPU).sample(logits, rows(7, temperature=0.0)) == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy_seeded_or_not():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))
    batch = [RowSampling(SamplingParams(temperature=1.3, top_k=1, seed=s)) for s in (None, 5, None, 9, 11, None)]
    assert Sampler(CPU, seed=3).sample(logits, batch) == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    batch = [RowSampling(SamplingParams(temperature=t)) for t in (0.0, 1.0, 0.0, 2.0)]
    out = Sampler(CPU).sample(logits, batch)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_seeded_rows_reproduce_whatever_the_batch():
    gen = torch.Generator().manual_seed(3)
    target_logits = torch.randn(1000, generator=gen)
    target = RowSampling(SamplingParams(temperature=1.0, top_p=0.95, seed=1234), output_index=1, generated_index=7)
    alone = Sampler(CPU, seed=0).sample(target_logits[None], [target])[0]
    others = torch.randn(5, 1000, generator=gen)
    for position in range(6):
        logits = torch.cat([others[:position], target_logits[None], others[position:]])
        batch = [RowSampling(SamplingParams(temperature=1.0, seed=s)) for s in (None, 7, None, 99, None)]
        batch.insert(position, target)
        # A different worker seed changes the unseeded rows only.
        assert Sampler(CPU, seed=position + 10).sample(logits, batch)[position] == alone


def test_seeded_randomness_depends_on_seed_output_and_token_index():
    flat = torch.zeros(1, 1000)  # uniform: the token is the noise's argmax
    sampler = Sampler(CPU)

    def draw(seed, output_index, generated_index):
        row = RowSampling(SamplingParams(temperature=1.0, seed=seed), output_index, generated_index)
        return sampler.sample(flat, [row])[0]

    assert len({draw(42, 0, i) for i in range(20)}) > 15  # varies along the generation
    assert draw(42, 0, 3) == draw(42, 0, 3)
    assert [draw(42, 0, i) for i in range(8)] != [draw(42, 1, i) for i in range(8)]  # n > 1 outputs differ
    assert [draw(42, 0, i) for i in range(8)] != [draw(43, 0, i) for i in range(8)]
    assert seeded_row_key(-5, 0, 0) >= 0


def test_top_k_and_top_p_never_leave_their_sets():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(200, generator=gen) * 3
    num_draws = 3000
    logits = base.expand(num_draws, -1).contiguous()
    probs = torch.softmax(base, -1)
    order = probs.argsort(descending=True)
    top5 = set(order[:5].tolist())
    cumulative = probs[order].cumsum(0)
    nucleus = set(order[: int((cumulative < 0.6).sum()) + 1].tolist())  # smallest set with mass >= 0.6
    sampler = Sampler(CPU, seed=0)
    assert set(sampler.sample(logits, rows(num_draws, top_k=5))) <= top5
    assert set(sampler.sample(logits, rows(num_draws, top_p=0.6))) <= nucleus
    both = set(sampler.sample(logits, rows(num_draws, top_p=0.6, top_k=2)))
    assert both <= set(order[:2].tolist()) & nucleus
    seeded = [RowSampling(SamplingParams(top_k=5, seed=11), 0, i) for i in range(num_draws)]
    assert set(sampler.sample(logits, seeded)) <= top5
    assert len(set(sampler.sample(logits, rows(num_draws, top_k=5)))) == 5  # and they do use the whole set


def test_temperature_sampling_frequencies():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    temperature, num_draws = 0.7, 20000
    expected = torch.softmax(logits / temperature, -1)
    sampled = Sampler(CPU, seed=0).sample(logits.expand(num_draws, -1).contiguous(),
                                          rows(num_draws, temperature=temperature))
    counts = torch.bincount(torch.tensor(sampled), minlength=6).double()
    assert chi_square(counts, expected.double()) < CHI2_999[5]


def test_seeded_sampling_frequencies_across_token_indices():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7])
    num_draws = 8000
    batch = [RowSampling(SamplingParams(temperature=1.0, seed=2024), 0, i) for i in range(num_draws)]
    sampled = Sampler(CPU).sample(logits.expand(num_draws, -1).contiguous(), batch)
    counts = torch.bincount(torch.tensor(sampled), minlength=4).double()
    assert chi_square(counts, torch.softmax(logits, -1).double()) < CHI2_999[3]


def test_top_p_renormalises_within_the_nucleus():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    num_draws = 20000
    sampled = Sampler(CPU, seed=1).sample(logits.expand(num_draws, -1).contiguous(), rows(num_draws, top_p=0.8))
    counts = torch.bincount(torch.tensor(sampled), minlength=5).double()
    assert counts[3:].sum() == 0  # 0.4 + 0.3 < 0.8 <= 0.4 + 0.3 + 0.15: three tokens kept
    kept = torch.tensor([0.4, 0.3, 0.15], dtype=torch.float64)
    assert chi_square(counts[:3], kept / kept.sum()) < 13.82  # df 2
