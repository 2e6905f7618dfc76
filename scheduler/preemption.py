"""Preemption: what a sequence that loses its seat keeps, and where it waits.

By recompute, its KV blocks are freed and it waits (with every token it has) to
be prefilled again; by swap, its blocks move to host memory and it waits in the
swapped queue to be copied back. Either way no token is lost.
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.batch import Batch, PreemptionMode
from scheduler.block_manager import BlockManager
from scheduler.seq_queue import SeqQueue
from scheduler.sequence import Sequence, SeqStatus

OnPreempt = Callable[[Sequence, str, PreemptionMode], None]  # (victim, cause, mode)


class Preemption:
    """Moves victims out of the running set into `waiting` or `swapped` (the policy's queues).

    `mode` "swap" swaps out when the host has room for the whole table, else it
    falls back to recompute. `on_preempt` is called before the victim's blocks
    are freed or swapped (the scheduler counts and logs it there)."""

    def __init__(self, block_manager: BlockManager, *, mode: PreemptionMode, waiting: SeqQueue, swapped: SeqQueue,
                 on_preempt: OnPreempt) -> None:
        self.block_manager = block_manager
        self.mode = mode
        self.waiting = waiting
        self.swapped = swapped
        self.on_preempt = on_preempt

    def preempt(self, seq: Sequence, cause: str, batch: Batch | None) -> None:
        """`seq`, already out of the running list, is preempted. Without a `batch` (the
        worker lost its state: nothing to swap out) it is always by recompute."""
        bm = self.block_manager
        # One with nothing left to compute (a beam waiting for its siblings) could not come back by
        # swap-in, which schedules a token: it is recomputed (scheduler/beam_search.py parks it).
        swap = (self.mode == "swap" and batch is not None and seq.num_computed_tokens < seq.num_tokens
                and bm.can_swap_out(seq.seq_id))
        mode: PreemptionMode = "swap" if swap else "recompute"
        self.on_preempt(seq, cause, mode)
        seq.num_preemptions += 1
        if batch is not None:
            batch.preempted.append((seq, mode))
        if swap:
            batch.swap_out.extend(bm.swap_out(seq.seq_id))
            seq.status = SeqStatus.SWAPPED
            self.swapped.push(seq)
            return
        bm.free(seq.seq_id)
        self.to_waiting(seq)

    def to_waiting(self, seq: Sequence) -> None:
        """`seq` holds no blocks any more: it waits to be prefilled again."""
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.push(seq)
