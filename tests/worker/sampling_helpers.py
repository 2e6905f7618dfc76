"""Builds sampler inputs for unit tests: one `SamplingState` row per `SamplingParams`."""

from __future__ import annotations

import numpy as np
import torch

from shared.protocol import SamplingParams
from worker.sampler import Sampler
from worker.sampling_state import SamplingMetadata, SamplingState

CPU = torch.device("cpu")


def make_batch(params: list[SamplingParams], vocab: int, *, prompts: list[list[int]] | None = None,
               outputs: list[list[int]] | None = None, output_indices: list[int] | None = None,
               generated: list[int] | None = None, eos: tuple[int, ...] = ()) -> tuple[SamplingState, SamplingMetadata]:
    """Row i holds params[i] with prompt prompts[i] (default [0]) and generated tokens outputs[i];
    it samples generated token number generated[i] (default len(outputs[i]))."""
    n = len(params)
    prompts = prompts or [[0]] * n
    outputs = outputs or [[]] * n
    output_indices = output_indices or [0] * n
    generated = generated if generated is not None else [len(o) for o in outputs]
    state = SamplingState(n, vocab, CPU, eos)
    for row in range(n):
        state.set_row(row, params[row], output_indices[row], prompts[row] + outputs[row], len(prompts[row]))
    return state, state.metadata(np.arange(n, dtype=np.int64), np.asarray(generated, dtype=np.int64))


def sample(logits: torch.Tensor, params: list[SamplingParams], sampler: Sampler | None = None, **kw) -> list[int]:
    state, meta = make_batch(params, logits.shape[-1], **kw)
    return (sampler or Sampler(CPU)).sample(logits, meta, state).token_ids.tolist()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic over the categories with probs > 0 (counts elsewhere must be 0)."""
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token outside the allowed set"
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum())


# chi-square 0.999 quantiles by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 9: 27.88, 11: 31.26}
