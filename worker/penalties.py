"""Logit changes that depend on what a sequence has seen: min_tokens and the three penalties.

Semantics follow vLLM (and, for repetition_penalty, transformers' RepetitionPenaltyLogitsProcessor):

* repetition_penalty p, over tokens of the prompt *or* the output: a positive logit is divided
  by p, a negative one multiplied by p;
* frequency_penalty f and presence_penalty r, over output tokens only:
  ``logit -= f * count + r * (count > 0)``;
* min_tokens: EOS (unless ignore_eos) and stop_token_ids get -inf while fewer than min_tokens
  tokens have been generated.
"""

from __future__ import annotations

import torch

from worker.sampling_state import SamplingMetadata, SamplingState


def apply_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.min_tokens_stop_ids is None:
        return logits
    ids = meta.min_tokens_stop_ids
    row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    keep = ids >= 0
    logits[row[keep], ids[keep]] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata, state: SamplingState) -> torch.Tensor:
    if meta.repetition_penalty is None:
        return logits
    rows = meta.penalty_rows
    # Advanced indexing: index_select on CPU is ~30x slower for rows this wide (torch 2.13).
    state_rows = meta.rows[rows]
    counts = state.output_counts[state_rows]  # a copy (advanced indexing): the adds stay in this step
    if meta.penalty_count_adds is not None:
        index, tokens = meta.penalty_count_adds
        counts.index_put_((index, tokens), torch.ones_like(tokens, dtype=counts.dtype), accumulate=True)
    seen_in_output = counts > 0
    seen = seen_in_output | state.prompt_mask[state_rows]
    penalised = logits[rows]
    penalty = meta.repetition_penalty[:, None]
    repeated = torch.where(penalised > 0, penalised / penalty, penalised * penalty)
    penalised = torch.where(seen, repeated, penalised)
    penalised -= meta.frequency_penalty[:, None] * counts.to(penalised.dtype)
    penalised -= meta.presence_penalty[:, None] * seen_in_output.to(penalised.dtype)
    logits = logits.clone()
    logits[rows] = penalised
    return logits
