"""Speculative decoding in the scheduler: proposals into the plan, accepted tokens out of the result.

Per step: `attach(batch)` gives each eligible decoding sequence up to k proposed tokens
(`Sequence.spec_token_ids`, n-gram lookup, scheduler/spec_ngram.py; or, with the draft-model
method, a count `Sequence.spec_num_draft` of tokens the worker's draft model will propose) and
reserves their KV slots after its known tokens, within the step's token budget and the free
blocks (speculation never preempts anyone). The worker verifies the k + 1 positions in one
forward and returns 1..k+1 tokens (StepResult.extra_tokens). `settle(seq, ...)` then moves
`num_computed_tokens` to the accepted ones and gives back the slots of the rejected ones: blocks
that held only rejected slots are freed and the worker told to truncate its table
(`Sequence.worker_table_len`). Rejected slots in a kept block are overwritten by later tokens.
The prefix cache only sees tokens after they were accepted (mark_computed runs on the accepted
count), so speculative tokens never enter it.

Eligible: a plain decode (one token, the sequence's last) of a sequence without beams, pending
forks or crash suspicion (docs/speculative.md lists these limits). Penalties are fine: each
verification row counts the proposals before it (worker/input_batch.py). A grammar row takes
n-gram proposals cut to what its grammar accepts, and gets a mask per verification position
(scheduler/grammar_masks.py); with the draft method it does not speculate. N-gram proposals are a pure
function of the tokens, and the draft model's KV cache is written wherever the target's is
(worker/spec_draft.py), so recompute and restarts lose nothing.
"""

from __future__ import annotations

import math

from scheduler.batch import Batch
from scheduler.block_manager import BlockManager
from scheduler.sequence import Sequence
from scheduler.spec_ngram import propose_ngram
from shared.config import SchedulerConfig
from shared.protocol import ScheduledSeq

ACCEPTANCE_WEIGHT = 0.3  # of the latest step in a sequence's running acceptance rate
# Below this running acceptance a sequence stops speculating and only probes (one proposal) once
# every PROBE_EVERY eligible steps: a rejected proposal still costs a wider verification forward
# (and, with a draft model, its passes), so a draft that never hits must not slow its sequences.
# One accepted probe lifts the rate back over the floor (0.7 * r + 0.3).
MIN_ACCEPTANCE = 0.1
PROBE_EVERY = 16
SPEC_COUNTERS = ("spec_rows", "spec_proposed_tokens", "spec_accepted_tokens", "spec_steps_skipped")


class SpecDecoder:
    """Owns the speculation counters; proposals live on each `Sequence` for the step in flight."""

    def __init__(self, block_manager: BlockManager, *, method: str, num_tokens: int, lookup_min: int,
                 lookup_max: int, max_model_len: int, max_batch: int = 0) -> None:
        self.block_manager = block_manager
        self.enabled = method != "none" and num_tokens > 0
        self.draft = method == "draft"  # the worker's draft model proposes into the reserved slots
        self.num_tokens = num_tokens  # proposals per sequence per step, at most (tokens)
        self.lookup_min, self.lookup_max = lookup_min, lookup_max
        self.max_model_len = max_model_len
        # Speculate only in steps with at most this many sequences (0: any): past it the step is
        # compute-bound and verification costs more than it saves (docs/speculative.md, measured).
        self.max_batch = max_batch
        self.counters = dict.fromkeys(SPEC_COUNTERS, 0)
        self.accepted_at = [0] * num_tokens  # rows whose proposal j (0-based) was accepted

    @classmethod
    def from_config(cls, block_manager: BlockManager, config: SchedulerConfig, max_model_len: int) -> SpecDecoder:
        return cls(block_manager, method=config.speculative_method, num_tokens=config.num_speculative_tokens,
                   lookup_min=config.prompt_lookup_min, lookup_max=config.prompt_lookup_max,
                   max_model_len=max_model_len, max_batch=config.speculative_max_batch)

    def attach(self, batch: Batch) -> int:
        """Propose for the eligible decodes of `batch` and reserve their slots (blocks appended to
        the batch entry, so the plan carries them). Every scheduled sequence leaves with its
        `spec_token_ids` set: [] when it does not speculate. Returns the tokens proposed (slots
        reserved), which the step computes besides its batch's."""
        for seq, _, _ in batch.scheduled:
            seq.spec_token_ids, seq.spec_num_draft = [], 0
        if not self.enabled or (self.max_batch and len(batch.scheduled) > self.max_batch):
            self.counters["spec_steps_skipped"] += self.enabled
            return 0
        proposed = 0
        leftover = batch.budget - batch.num_tokens  # the step's token budget counts the proposals too
        bm = self.block_manager
        for index, (seq, num, new_blocks) in enumerate(batch.scheduled):
            if leftover <= 0:
                break
            if not self._eligible(seq, num, self.draft) or self._backing_off(seq):
                continue
            k = min(self.length_for(seq), leftover, seq.request.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - seq.num_tokens)
            proposal = [] if self.draft else propose_ngram(seq.token_ids, k, self.lookup_min, self.lookup_max)
            if seq.grammar is not None and proposal:  # only what the grammar allows: each position gets a mask
                proposal = proposal[:seq.grammar.validate_tokens(proposal)]
            size = max(0, k) if self.draft else len(proposal)
            while size and not bm.can_append(seq.seq_id, size):
                size -= 1  # only free blocks: speculation never preempts
            if not size:
                continue
            extra, copy = bm.append_slots(seq.seq_id, size)
            if copy is not None:  # the policy copied a shared last block already; kept for safety
                batch.copy.append(copy)
                batch.rebuilt.append(seq)
            # A new list: an entry's block list may be the live table.
            batch.scheduled[index] = (seq, num, list(new_blocks) + extra)
            seq.spec_token_ids = proposal[:size]
            seq.spec_num_draft = size if self.draft else 0
            leftover -= size
            proposed += size
        return proposed

    def length_for(self, seq: Sequence) -> int:
        """Adaptive proposal length (tokens): K scaled by the sequence's recent acceptance, at least 1
        (a proposal is only made when an n-gram matches, so a low rate costs one slot a step)."""
        return max(1, min(self.num_tokens, math.ceil(seq.spec_acceptance * self.num_tokens)))

    @staticmethod
    def _backing_off(seq: Sequence) -> bool:
        """True for a sequence whose proposals keep failing, except on every PROBE_EVERY-th call."""
        if seq.spec_acceptance >= MIN_ACCEPTANCE:
            return False
        seq.spec_backoff_steps += 1
        if seq.spec_backoff_steps < PROBE_EVERY:
            return True
        seq.spec_backoff_steps = 0
        return False

    @staticmethod
    def _eligible(seq: Sequence, num_tokens: int, draft: bool) -> bool:
        # A grammar row speculates with n-gram proposals only: the scheduler must know the proposed
        # tokens to fill each verification position's mask (scheduler/grammar_masks.py).
        return (num_tokens == 1 and seq.num_computed_tokens + 1 == seq.num_tokens and seq.request.beam is None
                and (seq.grammar is None or not draft) and not seq.children and not seq.crashes)

    def settle(self, seq: Sequence, work: ScheduledSeq, tokens: list[int]) -> int:
        """The worker answered `work` (which speculated, k proposals or k draft slots) with `tokens` (1..k+1): the new
        `num_computed_tokens` (known tokens plus the accepted proposals) and frees the slots of
        the rejected ones. Raises ValueError on tokens that cannot answer the proposal."""
        proposal = work.spec_token_ids  # empty for the draft method: the worker's draft proposed them
        proposed = len(proposal) or work.num_draft_tokens
        accepted = len(tokens) - 1
        if not 0 <= accepted <= proposed or (proposal and tokens[:accepted] != proposal[:accepted]):
            raise ValueError(f"sequence {seq.seq_id}: tokens {tokens} do not answer proposal "
                             f"{proposal or f'of {proposed} draft tokens'}")
        seq.spec_token_ids, seq.spec_num_draft = [], 0
        seq.spec_proposed += proposed
        seq.spec_accepted += accepted
        rate = accepted / proposed
        seq.spec_acceptance = (1 - ACCEPTANCE_WEIGHT) * seq.spec_acceptance + ACCEPTANCE_WEIGHT * rate
        c = self.counters
        c["spec_rows"] += 1
        c["spec_proposed_tokens"] += proposed
        c["spec_accepted_tokens"] += accepted
        for j in range(accepted):
            self.accepted_at[j] += 1
        num_computed = work.num_computed_tokens + work.num_tokens + accepted
        if self._trim_slots(seq.seq_id, num_computed):
            seq.worker_table_len = len(seq.block_table)
        return num_computed

    def _trim_slots(self, seq_id: int, num_slots: int) -> bool:
        """Shrink `seq_id`'s reservation to `num_slots` tokens, freeing whole blocks past them
        (never shared: they were appended for proposals). True if any block was freed.
        Reaches into BlockManager's tables: it is at its size limit, and this is its only shrink."""
        bm = self.block_manager
        table = bm._tables[seq_id]
        keep = bm.blocks_needed(num_slots)
        bm._num_slots[seq_id] = num_slots
        freed = table[keep:]
        del table[keep:]
        for block_id in reversed(freed):
            bm._device.release(block_id)
        return bool(freed)

    def stats(self) -> dict[str, int | float]:
        """The counters, per proposal position j the rows that accepted it (spec_accepted_pos_j), the
        acceptance rate (accepted / proposed tokens) and the mean accepted length (accepted tokens
        per verifying row), both since start, 0 before the first proposal."""
        if not self.enabled:
            return {}
        c = self.counters
        return {**c, **{f"spec_accepted_pos_{j}": n for j, n in enumerate(self.accepted_at)},
                "spec_acceptance_rate": round(c["spec_accepted_tokens"] / max(1, c["spec_proposed_tokens"]), 4),
                "spec_mean_accepted_length": round(c["spec_accepted_tokens"] / max(1, c["spec_rows"]), 4)}
