"""Beam search's share of sampling: each beam row's best next tokens, for the scheduler to choose.

A beam row (`ScheduledSeq.num_candidates` > 0) samples nothing: the worker returns its top
`num_candidates` tokens by log_softmax of the raw float32 logits (natural log), as transformers'
beam search scores them, and appends no token (the scheduler sends the chosen one back in the
next step's `append_token_ids`). Rank 0 alone computes them (it alone has the logits and answers).
"""

from __future__ import annotations

import torch

from shared.protocol import BeamCandidates, ScheduledSeq, StepResult


def beam_rows(scheduled: list[ScheduledSeq], sampled_positions: list[int]) -> list[int]:
    """Indices into the sampled rows (`StepInputs.sampled_positions`) of the beam rows."""
    return [i for i, position in enumerate(sampled_positions) if scheduled[position].num_candidates]


def add_candidates(result: StepResult, logits: torch.Tensor, rows: list[int], scheduled: list[ScheduledSeq],
                   sampled_positions: list[int]) -> None:
    """Fill `result.candidates` for beam `rows` of `logits` (float32 ``[sampled rows, vocab]``):
    one device->host copy for all of them."""
    positions = [sampled_positions[r] for r in rows]
    ks = [min(scheduled[p].num_candidates, logits.shape[-1]) for p in positions]
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).to(torch.float32), dim=-1)
    top_logprobs, top_ids = logprobs.topk(max(ks), dim=-1)
    ids, lps = top_ids.tolist(), top_logprobs.tolist()
    if not result.candidates:
        result.candidates = [None] * len(scheduled)
    for i, (position, k) in enumerate(zip(positions, ks)):
        result.candidates[position] = BeamCandidates(ids[i][:k], lps[i][:k])
