"""Applies the scheduler's grammar masks (`StepMasks`) to a step's logits, before sampling.

A masked row keeps only the tokens its grammar allows: the others get -inf, before
penalties, temperature and the top-k/top-p/min-p filters (so those act on the allowed
tokens only) and before the logprobs are taken (they describe what could be sampled, as
vLLM's do). Bits: row r, token t is allowed when bit t % 32 of little-endian int32 word
t // 32 is set; bits past the vocabulary are ignored.
"""

from __future__ import annotations

import torch

from shared.protocol import StepPlan


def apply_grammar_masks(logits: torch.Tensor, bitmask: bytes, logit_rows: list[int]) -> None:
    """In place. `logits` float32 ``[rows, vocab]``; `bitmask` holds len(logit_rows) mask rows,
    row i for `logits[logit_rows[i]]`."""
    if not logit_rows:
        return
    vocab = logits.shape[1]
    words = torch.frombuffer(bytearray(bitmask), dtype=torch.int32).view(len(logit_rows), -1)
    if words.shape[1] * 32 < vocab:
        raise ValueError(f"grammar masks of {words.shape[1] * 32} tokens for a vocabulary of {vocab}")
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(logit_rows), -1)[:, :vocab].bool()
    index = torch.tensor(logit_rows, dtype=torch.int64, device=logits.device)
    rows = logits.index_select(0, index)
    rows.masked_fill_(~allowed.to(logits.device), float("-inf"))
    logits.index_copy_(0, index, rows)


def mask_logit_rows(plan: StepPlan, sampled_positions: list[int],
                    spec_rows: list[tuple[int, object, list[int]]]) -> list[int]:
    """The logits row of each mask in the step's `StepMasks`, in its order: per masked row its
    sampled row, then its speculative verification rows. Sampled rows come first in the logits,
    in `sampled_positions` order; verification rows follow, `spec_rows` (index into
    sampled_positions, sequence, proposal) in order, len(proposal) each."""
    row_of = {position: i for i, position in enumerate(sampled_positions)}
    verification_of, offset = {}, len(sampled_positions)
    for index, _, proposal in spec_rows:
        verification_of[sampled_positions[index]] = range(offset, offset + len(proposal))
        offset += len(proposal)
    rows = []
    for position in plan.masked_rows:
        rows.append(row_of[position])
        rows.extend(verification_of.get(position, ()))
    return rows
