"""Token masks for the constrained rows of a step, and each sequence's matcher moving on.

The plan goes to the workers first; the masks of its constrained rows are computed while
they run the forward (`StepMasks`, to rank 0, which waits for it before sampling). A mask
depends only on the tokens each sequence has so far, all known when the plan leaves.

Matchers live on their `Sequence` (`Sequence.grammar`) and advance in `accept`, with every
token the scheduler appends; preemption (recompute or swap), worker restarts and forks never
change a sequence's tokens, so they never need a matcher rebuilt. EOS is in a mask only where
the grammar may end; a grammar that can go no further finishes its sequence with "stop".
"""

from __future__ import annotations

import ctypes
import time

import llguidance

from scheduler.grammar_compiler import brief
from scheduler.sequence import Sequence
from shared.logging import get_logger
from shared.protocol import StepMasks, StepPlan

log = get_logger("scheduler")


class MaskFiller:
    """Owns the llguidance executor (its own threads; the GIL is released while it fills) and
    the mask counters. Units: a mask row is ceil(vocab_size / 32) int32 words."""

    def __init__(self, vocab_size: int) -> None:
        self.row_bytes = 4 * ((vocab_size + 31) // 32)
        self._executor = llguidance.LLExecutor()
        self.counters = self.zero_counters()

    @staticmethod
    def zero_counters() -> dict:
        """Totals since start: steps with masks, rows masked, seconds spent filling them."""
        return {"structured_mask_steps": 0, "structured_masks": 0, "structured_mask_fill_s": 0.0}

    def masks(self, plan: StepPlan, seqs: list[Sequence]) -> StepMasks:
        """The masks of `plan.masked_rows`, whose sequences are `seqs` in that order: per row, the
        mask of its next token, then one after each of its speculative proposals (the matcher
        advanced over the proposals before it and rolled back; the proposals were cut to what
        the grammar accepts when they were made)."""
        started = time.perf_counter()
        proposals = [plan.scheduled[row].spec_token_ids for row in plan.masked_rows]
        starts, num_masks = [], 0
        for proposal in proposals:
            starts.append(num_masks)
            num_masks += 1 + len(proposal)
        buffer = bytearray(self.row_bytes * num_masks)
        address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
        rows = list(zip(seqs, starts, proposals))
        plain = [(seq.grammar, start) for seq, start, proposal in rows if not proposal]
        speculating = [(seq.grammar, start, list(proposal)) for seq, start, proposal in rows if proposal]
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, address, self.row_bytes, num_masks)
        if speculating:  # llguidance refuses an empty proposal here
            self._executor.unsafe_compute_mask_ptr_with_draft_token(speculating, address, self.row_bytes, num_masks)
        c = self.counters
        c["structured_mask_steps"] += 1
        c["structured_masks"] += num_masks
        c["structured_mask_fill_s"] += time.perf_counter() - started
        return StepMasks(step_id=plan.step_id, bitmask=bytes(buffer))


def accept(seq: Sequence, token: int) -> str | None:
    """Move `seq`'s matcher over `token`, just appended. Returns None while the grammar goes on;
    "done" once it can go no further (finish with stop); "rejected" for a token the mask did
    not allow (a worker that ignored the mask: finish with error)."""
    matcher = seq.grammar
    if not matcher.consume_token(token):
        log.error("structured.token_rejected", request_id=seq.request_id, seq_id=seq.seq_id, token=token,
                  error=brief(matcher.get_error()))
        return "rejected"
    return "done" if matcher.is_stopped() else None
