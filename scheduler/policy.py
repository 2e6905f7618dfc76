"""Which sequences run each step: FCFS by (priority, arrival), continuous
batching, decode-first (stall-free) steps with chunked prefill, preemption by
recompute or swap, fork for n > 1.

Pure policy over the block manager: no sockets, no protocol messages, no
logging (the scheduler turns a `Batch` into a `StepPlan` and logs preemptions
through the `on_preempt` hook). `BatchPolicy` orders the step; what it decides
for each kind of sequence is in its own file: scheduler/policy_running.py,
scheduler/policy_swapped.py, scheduler/policy_waiting.py, scheduler/preemption.py.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from scheduler.batch import Batch, PreemptionMode, next_chunk
from scheduler.block_manager import BlockManager
from scheduler.isolation import Isolation
from scheduler.policy_running import RunningPolicy
from scheduler.policy_swapped import SwappedPolicy
from scheduler.policy_waiting import WaitingPolicy
from scheduler.preemption import OnPreempt, Preemption
from scheduler.seq_queue import SeqQueue
from scheduler.sequence import Sequence, SeqStatus
from scheduler.step_budget import StepBudget

__all__ = ["Batch", "BatchPolicy", "PreemptionMode"]

_policy_order = attrgetter("sort_key")


class BatchPolicy:
    """Owns the running list and the waiting and swapped queues; builds each step's batch.

    `running` is kept in policy order (best first), so the most important
    sequences are served first and the preemption victim (lowest priority,
    then latest arrival) is always `running[-1]`.

    Order within a step, `batching_policy` "decode_first" (opt-in): every
    running decode gets its token; then the step's token budget (`StepBudget`:
    max_num_batched_tokens, or what the step-time model allows within
    `target_tpot_ms` while anything decodes) goes to prefill chunks of at most
    `chunk_cap` tokens each: running prefills first, then, if nothing had to be
    preempted and no running prefill was short of blocks, swapped sequences come
    back, then, only once none is left swapped, waiting ones are admitted (new
    and recomputing alike, in policy order). So a prefill never delays a decode,
    and under overload the queue grows, not the step.

    "fcfs" (the default): running sequences
    in policy order each take their next chunk (one token for a decode, up to the
    whole budget for a prefill); then swapped, then waiting, as above; no cap, no
    target. Either way admissions and swap-ins keep the watermark free unless
    nothing else runs.

    After a worker failure the sequences of the step in flight are suspects
    (scheduler/isolation.py): while one is runnable, each step runs it alone
    (others keep their blocks and wait, and are preempted only for the blocks or
    the seat it needs) until it samples a token.

    Progress: admission guarantees each sequence fits the whole cache on its
    own, and the best running sequence is never its own victim, so it always
    gets its chunk; the heads of the swapped and waiting queues are overtaken
    by nothing, and the running set drains until they fit.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        preemption_mode: PreemptionMode = "recompute",
        on_preempt: OnPreempt = lambda seq, cause, mode: None,
        batching_policy: str = "fcfs",  # or "decode_first" (shared/config.py)
        chunk_cap: int = 0,
        target_tpot_ms: float | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens  # tokens per step
        self.enable_chunked_prefill = enable_chunked_prefill
        self.decode_first = batching_policy == "decode_first"
        # Tokens one sequence prefills per step at most (0: no cap); fcfs has none.
        self.chunk_cap = chunk_cap if self.decode_first else 0
        self.step_budget = StepBudget(max_num_batched_tokens, target_tpot_ms if self.decode_first else None)
        self.running: list[Sequence] = []
        self.waiting = SeqQueue()
        self.swapped = SeqQueue()
        self.isolation = Isolation()
        self.preemption = Preemption(block_manager, mode=preemption_mode, waiting=self.waiting,
                                     swapped=self.swapped, on_preempt=on_preempt)
        self._running_policy = RunningPolicy(block_manager, self.preemption,
                                             enable_chunked_prefill=enable_chunked_prefill)
        self._swapped_policy = SwappedPolicy(block_manager, self.swapped, max_num_seqs=max_num_seqs,
                                             enable_chunked_prefill=enable_chunked_prefill, chunk_cap=self.chunk_cap)
        self._waiting_policy = WaitingPolicy(block_manager, self.waiting, max_num_seqs=max_num_seqs,
                                             enable_chunked_prefill=enable_chunked_prefill, chunk_cap=self.chunk_cap)

    def enqueue(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def schedule_next_batch(self) -> Batch:
        batch = Batch(budget=self.max_num_batched_tokens)
        suspect = self.isolation.next_suspect()
        if suspect is not None and self._run_alone(suspect, batch):
            self.step_budget.record(*batch.split_tokens(), batch.budget)
            return batch
        if self.decode_first:
            token_budget = self._running_policy.schedule_decode_first(self.running, batch, self.step_budget,
                                                                      self.chunk_cap)
        else:
            token_budget = self._running_policy.schedule(self.running, batch, self.max_num_batched_tokens)
        # Preempting means memory ran out this step: bringing anyone in now
        # would only evict someone else at the next block boundary.
        if not batch.preempted and not batch.short_of_blocks:
            batch.occupied = sum(1 + len(seq.children) for seq in self.running)
            seats = min(self.max_num_seqs, self.step_budget.seats() or self.max_num_seqs)
            token_budget = self._swapped_policy.swap_in(batch, token_budget, seats)
            if not self.swapped:
                self._waiting_policy.admit(batch, token_budget, seats)
        joined = batch.swapped_in + batch.admitted
        if joined:
            self.running.extend(joined)
            self.running.sort(key=_policy_order)
        self.step_budget.record(*batch.split_tokens(), batch.budget)
        return batch

    def observe_step(self, step_time_s: float, step_id: int = -1) -> str | None:
        """The time of the step last scheduled (seconds; its cycle, scheduler/step_budget.py): the
        step-time model learns from it; returns why it ran over `target_tpot_ms`, if it did."""
        return self.step_budget.observe(step_time_s, step_id)

    def _run_alone(self, seq: Sequence, batch: Batch) -> bool:
        """`seq`'s next chunk is the whole step; False if it has none (then the step is a
        normal one). Admission checked that it fits the cache on its own, so evicting the
        others always makes room."""
        bm = self.block_manager
        running = seq.status is SeqStatus.RUNNING
        num_tokens = next_chunk(seq.compute_limit - (seq.num_computed_tokens if running else 0),
                                self.max_num_batched_tokens, self.enable_chunked_prefill)
        if num_tokens <= 0:
            return False
        if running:
            self._evict_for(seq, lambda: bm.can_append(seq.seq_id, num_tokens), batch)
            self._running_policy.extend(seq, num_tokens, batch)
            return True
        seats = 1 + len(seq.children)
        self._evict_for(seq, lambda: bm.can_allocate(num_tokens) and (
            sum(1 + len(other.children) for other in self.running) + seats <= self.max_num_seqs), batch)
        self.waiting.remove(seq)
        seq.block_table = bm.allocate(seq.seq_id, num_tokens)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.RUNNING
        batch.admitted.append(seq)
        batch.scheduled.append((seq, num_tokens, []))
        self.running.append(seq)
        self.running.sort(key=_policy_order)
        return True

    def _evict_for(self, seq: Sequence, fits: Callable[[], bool], batch: Batch) -> None:
        """Preempt running sequences other than `seq`, worst first, until `fits()`."""
        while not fits():
            victim = next(other for other in reversed(self.running) if other is not seq)
            self.running.remove(victim)
            self.preemption.preempt(victim, "isolation", batch)

    def fork_children(self, parent: Sequence) -> list[Sequence]:
        """The parent computed its prompt but the last token: its pending
        outputs join the running set sharing every block of it."""
        children, parent.children = parent.children, []
        for child in children:
            child.block_table = self.block_manager.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SeqStatus.RUNNING
        self.running.extend(children)
        self.running.sort(key=_policy_order)
        return children

    def preempt_all(self, cause: str) -> list[Sequence]:
        """The worker lost its state (device and host caches): every running
        sequence is preempted by recompute, every swapped one goes back to
        waiting, and the prefix cache is forgotten."""
        victims = self.running[::-1]
        self.running = []
        for seq in victims:
            self.preemption.preempt(seq, cause, None)
        for seq in self.swapped.drain():
            self.block_manager.free(seq.seq_id)
            self.preemption.to_waiting(seq)
        self.block_manager.reset_prefix_cache()
        return victims

    def remove_finished(self) -> None:
        """O(running + waiting + swapped): after sequences finished or were aborted."""
        self.running = [seq for seq in self.running if seq.status is SeqStatus.RUNNING]
        self.waiting.remove_finished()
        self.swapped.remove_finished()

    def remove_finished_running(self) -> None:
        """O(running): after sequences finished."""
        self.running = [seq for seq in self.running if seq.status is SeqStatus.RUNNING]
