"""Batched sampling: greedy, temperature, top-k, top-p, seeds.

Sampling is an exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. per token picks
token i with probability ``probs[i]``. That keeps the whole batch in one pass; only the noise
differs per row. A seeded row's noise comes from a generator seeded with
``hash(seed, output_index, generated-token index)``, so its tokens reproduce whatever else is in
the batch, across preemption (recompute or swap) and restarts. Unseeded rows share one worker
generator, seeded from the server config.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from shared.protocol import SamplingParams


@dataclass(frozen=True)
class RowSampling:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    output_index: int = 0  # which of the request's n outputs
    generated_index: int = 0  # index of the token being sampled among the generated ones (0 = first)


def seeded_row_key(seed: int, output_index: int, generated_index: int) -> int:
    """A 63-bit generator seed that depends on these three numbers only (stable across
    processes and Python versions, unlike `hash`)."""
    data = struct.pack("<qqq", seed, output_index, generated_index)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed & ((1 << 63) - 1))
        self._row_generator = torch.Generator(device=device)

    def sample(self, logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
        """logits: float32 ``[len(rows), vocab]`` -> one token id per row."""
        if not rows:
            return []
        greedy = [r.params.temperature == 0.0 for r in rows]
        argmax = logits.argmax(dim=-1)
        if all(greedy):
            return argmax.tolist()
        probs = self._filtered_probs(logits, rows)
        noise = self._exponential_noise(probs.shape, rows, greedy)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_mask = torch.tensor(greedy, device=logits.device)
        return torch.where(greedy_mask, argmax, sampled).tolist()

    def _filtered_probs(self, logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
        """Softmax of logits / temperature, restricted to each row's top-k, then top-p set."""
        num_rows, vocab = logits.shape
        device = logits.device
        temperature = torch.tensor([r.params.temperature or 1.0 for r in rows], device=device)
        scaled = logits / temperature[:, None]
        top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        # A row without top-p gets an unreachable bound, so rounding in the cumsum never cuts it.
        top_p = [r.params.top_p if r.params.top_p < 1.0 else 2.0 for r in rows]
        if all(k == vocab for k in top_k) and all(p > 1.0 for p in top_p):
            return torch.softmax(scaled, dim=-1)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)
        sorted_logits.masked_fill_(rank[None, :] >= torch.tensor(top_k, device=device)[:, None], float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass before it is below top_p: the smallest set reaching top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut = mass_before >= torch.tensor(top_p, device=device)[:, None]
        sorted_probs.masked_fill_(cut, 0.0)
        return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)

    def _exponential_noise(self, shape: torch.Size, rows: list[RowSampling], greedy: list[bool]) -> torch.Tensor:
        # Ones: a greedy row's noise is never drawn (its sample is replaced by the argmax).
        noise = torch.ones(shape, dtype=torch.float32, device=self.device)
        unseeded = [i for i, r in enumerate(rows) if r.params.seed is None and not greedy[i]]
        if len(unseeded) == len(rows):
            noise.exponential_(generator=self.generator)
        elif unseeded:
            index = torch.tensor(unseeded, device=self.device)
            draw = torch.empty((len(unseeded), shape[1]), device=self.device).exponential_(generator=self.generator)
            noise.index_copy_(0, index, draw)
        for i, r in enumerate(rows):
            if r.params.seed is not None and not greedy[i]:
                self._row_generator.manual_seed(seeded_row_key(r.params.seed, r.output_index, r.generated_index))
                noise[i].exponential_(generator=self._row_generator)
        # Exp(1) can round to 0; 0/0 would be NaN, which argmax would pick.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)
