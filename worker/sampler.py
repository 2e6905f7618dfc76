"""Batched sampling: one pass over the whole batch, on the device.

Order (vLLM's): raw logits -> logprobs (of the raw distribution) -> min_tokens mask -> penalties
-> greedy rows take the argmax here; the others: temperature -> min_p -> top-k -> top-p ->
Gumbel-max: ``argmax(logits + G)`` with ``G = -log(E)``, ``E ~ Exp(1)``, picks token i with
probability ``softmax(logits)[i]``. Only the noise differs per row:

* a seeded row's noise is `worker.seeded_noise.gumbel_noise`, a pure function of
  (seed, output index, generated-token index, vocabulary position), so its tokens reproduce
  whatever the batch, across preemption (recompute or swap) and restarts;
* unseeded rows share one worker generator, seeded from the server config.

Filters follow transformers' TopK/TopP/MinP warpers: ties at the k-th logit are kept; top-p
keeps the smallest set whose mass reaches top_p (sorted ascending, drop while the cumulative
mass is <= 1 - top_p); min_p drops tokens below min_p times the top probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.protocol import TokenLogprobs
from worker.logprobs import sampled_logprobs
from worker.penalties import apply_min_tokens, apply_penalties
from worker.sampling_state import SamplingMetadata, SamplingState
from worker.seeded_noise import gumbel_noise


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B], on the device
    logprobs: list[TokenLogprobs | None] | None  # per row when any row asked, else None


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed & ((1 << 63) - 1))

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata, state: SamplingState) -> SamplerOutput:
        """logits: float32 ``[meta.num_rows, vocab]``, the model's raw output (not modified)."""
        logprobs = None
        if (meta.num_logprobs >= 0).any():
            logprobs = torch.log_softmax(logits, dim=-1)
        if meta.min_tokens_stop_ids is not None:
            logits = apply_min_tokens(logits.clone(), meta)
        logits = apply_penalties(logits, meta, state)
        argmax = logits.argmax(dim=-1)
        if meta.all_greedy:
            tokens = argmax
        else:
            # A new tensor (the division), so filter_logits may write into it.
            scores = filter_logits(logits / meta.temperature[:, None], meta) + self._gumbel(logits.shape, meta)
            tokens = torch.where(meta.greedy, argmax, scores.argmax(dim=-1))
        wire = sampled_logprobs(logprobs, tokens, meta.num_logprobs) if logprobs is not None else None
        return SamplerOutput(tokens, wire)

    def _gumbel(self, shape: torch.Size, meta: SamplingMetadata) -> torch.Tensor:
        # Zeros on greedy rows: their scores are never used.
        noise = torch.zeros(shape, dtype=torch.float32, device=self.device)
        if meta.unseeded_rows is not None:
            rows = meta.unseeded_rows
            exponential = torch.empty((len(rows), shape[1]), dtype=torch.float32, device=self.device)
            exponential.exponential_(generator=self.generator)
            # Exp(1) can round to 0 in float32; log(0) would make that token win whatever its probability.
            noise[rows] = exponential.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()
        if meta.seeded_index is not None:
            noise[meta.seeded_index] = gumbel_noise(meta.seed_words, shape[1])
        return noise


def filter_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """min_p, then top-k, then top-p, on temperature-scaled logits; dropped tokens get -inf.
    Each filter runs on the rows that use it only (a sort over the vocabulary is costly)."""
    if meta.min_p is not None:
        rows = meta.min_p_rows
        logits[rows] = apply_min_p(logits[rows], meta.min_p[rows])
    if meta.top_k is not None or meta.top_p is not None:
        rows = meta.top_k_top_p_rows
        logits[rows] = apply_top_k_top_p(logits[rows], None if meta.top_k is None else meta.top_k[rows],
                                         None if meta.top_p is None else meta.top_p[rows])
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * max probability`` (min_p ``[B]``)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """top_k int64 ``[B]`` (vocab size: off), top_p float32 ``[B]`` (1.0: off); one sort for both."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if top_k is not None:
        kth_largest = sorted_logits.gather(-1, (vocab - top_k.clamp(1, vocab))[:, None])
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p)[:, None]
        drop[:, -1] = False  # the most likely token always stays
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
