"""Speculative decoding on the worker: accept proposals from the verification samples.

The plan's proposal d_1..d_k for a sequence comes with k + 1 logits rows: the one after its last
known token (the sequence's normal sampled row) and one after each proposal. Every row is sampled
by the normal sampler, as the non-speculative step would sample that position (same penalties,
filters and, for seeded requests, the same noise: the generated-token index is the position's), giving
targets t_0..t_k. Proposals are accepted while d_j == t_{j-1}; the step yields t_0..t_a, a the
number accepted. Every emitted token is the target's own sample given a prefix of the target's own
samples, so greedy output equals non-speculative output, seeded output is reproducible whatever the
batch, and the distribution is exactly the target's: for a one-hot proposal q = delta(d), accepting
d with probability p(d) and otherwise sampling from p without d, renormalised, is the same as
sampling t ~ p and accepting d iff t == d (vLLM's rejection sampler, specialised to q one-hot).
"""

from __future__ import annotations

import torch

from shared.protocol import StepResult, TokenLogprobs
from worker.input_batch import InputBatch, StepInputs


def accept_proposals(batch: InputBatch, inputs: StepInputs, tokens: list[int], token_ids: torch.Tensor,
                     logprobs: list[TokenLogprobs | None] | None, result: StepResult) -> None:
    """After `batch.record` appended each row's t_0: append the accepted t_1..t_a to the worker's
    sequences, advance their computed counts by a, count them for penalties, and fill
    `result.extra_tokens` (and `extra_logprobs` when logprobs were computed). `tokens` (the same
    as `token_ids`, on the host) holds every sampled row, verification rows after the first ones."""
    num_scheduled = len(result.sampled)
    result.extra_tokens = [[] for _ in range(num_scheduled)]
    if logprobs is not None:
        result.extra_logprobs = [[] for _ in range(num_scheduled)]
    offset = len(inputs.sampled_positions)  # the first verification row
    counted_rows: list[int] = []
    counted_at: list[int] = []
    for index, seq, proposal in inputs.spec_rows:
        targets = [tokens[index]] + tokens[offset:offset + len(proposal)]
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == targets[accepted]:
            accepted += 1
        extra = targets[1:accepted + 1]
        position = inputs.sampled_positions[index]
        result.extra_tokens[position] = extra
        if logprobs is not None:
            result.extra_logprobs[position] = logprobs[offset:offset + accepted]
        seq.token_ids.extend(extra)
        seq.num_computed_tokens += accepted  # the accepted proposals' KV is now the sequence's
        counted_rows.extend([seq.row] * accepted)
        counted_at.extend(range(offset, offset + accepted))
        offset += len(proposal)
    if counted_at and inputs.sampling is not None:
        index = torch.tensor(counted_at, dtype=torch.int64, device=token_ids.device)
        rows = torch.tensor(counted_rows, dtype=torch.int64, device=token_ids.device)
        batch.sampling.count_sampled(rows, token_ids.index_select(0, index))
