"""From the policy's `Batch` to the `StepPlan` every worker rank gets; the one plan in flight.

The worker is told changes, not snapshots: a sequence entering the running set
(admitted, swapped in, forked) is sent once as a `NewSeq` with its whole table
and its `num_computed_tokens` (prefix-cache hits, swapped-in KV); then only its
new block ids. A sequence whose last block was replaced by a copy is sent whole
again (the worker replaces a known id). A sequence the worker holds is named
once in `finished_seq_ids` when it finishes, is aborted or is preempted.
Swap-outs, swap-ins and copies ride in the plan of the step that needs them.
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.batch import Batch
from scheduler.beam_search import mark_beam_row
from scheduler.sequence import Sequence
from shared.protocol import NewSeq, ScheduledSeq, StepPlan

# Totals since start, counted from the batches planned.
BATCH_COUNTERS = ("prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "blocks_swapped_out",
                  "blocks_swapped_in", "blocks_copied")


class StepPlanner:
    """Owns the step ids, the plan in flight (planned, its result not yet applied) and the
    ids of sequences to drop from the worker. Which sequences the worker holds is each
    `Sequence.on_worker`, set and cleared here only."""

    def __init__(self) -> None:
        self._next_step_id = 0
        self._in_flight: StepPlan | None = None
        self._to_drop: list[int] = []  # seq ids for the next plan's finished_seq_ids
        self.counters = dict.fromkeys(BATCH_COUNTERS, 0)

    @property
    def in_flight(self) -> StepPlan | None:
        return self._in_flight

    def plan(self, batch: Batch) -> StepPlan:
        """The plan for `batch`; it is in flight until `complete()` or `forget_worker()`.

        A batch that schedules nothing gives a plan that is not a step: it is not in flight,
        takes no step id, and its pending drops ride with the next plan. Only with no plan in
        flight (`Scheduler.schedule` checks)."""
        self._count(batch)
        if not batch.scheduled:
            if batch.swap_out:  # cannot happen (a preemption leaves its sequence scheduled), but never lose one
                raise RuntimeError("a plan that swaps out but schedules nothing")
            return StepPlan(step_id=self._next_step_id, scheduled=[])
        for seq in batch.rebuilt:
            seq.on_worker = False  # its table changed in place: send it whole again
        scheduled, new_seqs, masked_rows = [], [], []
        for seq, num_tokens, new_blocks in batch.scheduled:
            if seq.grammar is not None and seq.num_computed_tokens + num_tokens >= seq.num_tokens:
                masked_rows.append(len(scheduled))  # it samples: its grammar masks the token
            if seq.on_worker:
                work = ScheduledSeq(seq.seq_id, num_tokens, seq.num_computed_tokens, new_blocks,
                                    block_table_len=seq.worker_table_len)
            else:
                seq.on_worker = True
                seq.pending_tokens = 0  # the NewSeq carries every token
                work = ScheduledSeq(seq.seq_id, num_tokens, seq.num_computed_tokens)
                new_seqs.append(NewSeq(seq.seq_id, list(seq.token_ids), seq.prompt_len, list(seq.block_table),
                                       seq.request.params, seq.output_index))
            seq.worker_table_len = -1  # told now, or the NewSeq carries the table as it is
            work.spec_token_ids = seq.spec_token_ids  # proposals (scheduler/spec_decode.py), [] when none
            work.num_draft_tokens = seq.spec_num_draft  # or slots for the worker's draft model's proposals
            if seq.request.beam is not None:
                mark_beam_row(work, seq)
            scheduled.append(work)
        plan = StepPlan(step_id=self._next_step_id, scheduled=scheduled, new_seqs=new_seqs,
                        finished_seq_ids=self._to_drop, swap_out=batch.swap_out, swap_in=batch.swap_in,
                        copy=batch.copy, masked_rows=masked_rows)
        self._to_drop = []
        self._next_step_id += 1
        self._in_flight = plan
        return plan

    def complete(self) -> StepPlan:
        """The plan in flight was answered (or failed): it is no longer in flight."""
        plan, self._in_flight = self._in_flight, None
        if plan is None:
            raise ValueError("no step is in flight")
        return plan

    def release(self, seq: Sequence) -> None:
        """`seq` leaves the worker (finished, aborted, preempted): the next plan drops it."""
        if seq.on_worker:
            seq.on_worker = False
            self._to_drop.append(seq.seq_id)

    def forget_worker(self, seqs: Iterable[Sequence]) -> None:
        """The worker lost its state: the step in flight is forgotten and a fresh worker holds
        none of `seqs` (every unfinished sequence), so there is nothing to drop either."""
        self._in_flight = None
        for seq in seqs:
            seq.on_worker = False
        self._to_drop = []

    def _count(self, batch: Batch) -> None:
        c = self.counters
        c["prefix_cache_queried_tokens"] += batch.prefix_queried_tokens
        c["prefix_cache_hit_tokens"] += batch.prefix_hit_tokens
        c["blocks_swapped_out"] += len(batch.swap_out)
        c["blocks_swapped_in"] += len(batch.swap_in)
        c["blocks_copied"] += len(batch.copy)
