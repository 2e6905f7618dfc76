"""Which sequences run each step: FCFS by (priority, arrival), continuous
batching, preemption by recompute.

Pure policy over the block manager: no sockets, no protocol messages, no
logging (the scheduler turns a `Batch` into a `StepPlan` and logs preemptions
through the `on_preempt` hook).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter

from scheduler.block_manager import BlockManager
from scheduler.sequence import Sequence, SeqStatus

_policy_order = attrgetter("sort_key")


class WaitingQueue:
    """Sequences holding no KV, best first by `Sequence.sort_key`.

    A heap: push and pop cost O(log n). A preempted sequence keeps its key, so
    it returns ahead of everything of its priority that arrived after it.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float, int], Sequence]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Sequence]:
        return (seq for _, seq in self._heap)

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (seq.sort_key, seq))  # keys are unique: seqs are never compared

    def peek(self) -> Sequence:
        return self._heap[0][1]

    def pop(self) -> Sequence:
        return heapq.heappop(self._heap)[1]

    def remove_finished(self) -> None:
        """O(n): only after aborts, never per step."""
        self._heap = [entry for entry in self._heap if entry[1].status is not SeqStatus.FINISHED]
        heapq.heapify(self._heap)


@dataclass(slots=True)
class Batch:
    """One step's decisions. `scheduled` holds (sequence, tokens to compute,
    blocks newly appended to its table); an admitted sequence's chunk starts at
    token 0 and its whole table is new, so its entry lists no new blocks."""

    scheduled: list[tuple[Sequence, int, list[int]]] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # entered the running set
    preempted: list[Sequence] = field(default_factory=list)  # left it, back to waiting


class BatchPolicy:
    """Owns the running list and the waiting queue; builds each step's batch.

    `running` is kept in policy order (best first), so a decode pass serves
    the most important sequences first and the preemption victim (lowest
    priority, then latest arrival) is always `running[-1]`.

    Progress: admission guarantees each sequence fits the whole cache on its
    own, and the best running sequence is never its own victim, so it always
    gets its token; once the best waiting sequence reaches the head of the
    queue nothing overtakes it, and the running set drains until it fits.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        on_preempt: Callable[[Sequence, str], None] = lambda seq, cause: None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.on_preempt = on_preempt  # (victim, cause), called before its blocks are freed
        self.running: list[Sequence] = []
        self.waiting = WaitingQueue()

    def enqueue(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def schedule_next_batch(self) -> Batch:
        batch = Batch()
        token_budget = self._schedule_running(batch, self.max_num_batched_tokens)
        # Preempting means memory ran out this step: admitting someone now
        # would only evict someone else at the next block boundary.
        if not batch.preempted:
            self._admit_waiting(batch, token_budget)
        return batch

    def _schedule_running(self, batch: Batch, token_budget: int) -> int:
        """Give each running sequence its next chunk (one token, a decode),
        best first, preempting from the back when blocks run out."""
        i = 0
        while i < len(self.running) and token_budget > 0:
            seq = self.running[i]
            num_tokens = seq.num_tokens - seq.num_computed_tokens
            if not self._make_room(seq, num_tokens, batch):
                break  # seq itself was the victim: everything behind it is gone too
            batch.scheduled.append((seq, num_tokens, self.block_manager.append_slots(seq.seq_id, num_tokens)))
            token_budget -= num_tokens
            i += 1
        return token_budget

    def _make_room(self, seq: Sequence, num_tokens: int, batch: Batch) -> bool:
        """Preempt from the back until `seq` can grow; False if `seq` went too."""
        while not self.block_manager.can_append(seq.seq_id, num_tokens):
            victim = self.running.pop()
            self._preempt(victim, "kv_cache_full")
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, batch: Batch, token_budget: int) -> None:
        """Admit from the head of the queue while sequences, tokens and blocks allow."""
        admitted = batch.admitted
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting.peek()
            num_tokens = seq.num_tokens  # a fresh prompt, or prompt + generated after a preemption
            # FCFS: stop at the first that does not fit rather than let later ones overtake it.
            if num_tokens > token_budget or not self.block_manager.can_allocate(num_tokens):
                break
            self.waiting.pop()
            seq.block_table = self.block_manager.allocate(seq.seq_id, num_tokens)
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            batch.scheduled.append((seq, num_tokens, []))
            token_budget -= num_tokens
        if admitted:
            # Two sorted runs (running, then admitted in queue order): one O(n) merge.
            self.running.extend(admitted)
            self.running.sort(key=_policy_order)

    def _preempt(self, seq: Sequence, cause: str) -> None:
        """Recompute mode: drop the KV, keep the tokens, queue again."""
        self.on_preempt(seq, cause)
        self.block_manager.free(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.push(seq)

    def preempt_all(self, cause: str) -> list[Sequence]:
        """Preempt every running sequence (e.g. the worker lost its state)."""
        victims = self.running[::-1]
        self.running = []
        for seq in victims:
            self._preempt(seq, cause)
        return victims

    def remove_finished_running(self) -> None:
        """O(running): after sequences finished or were aborted."""
        self.running = [seq for seq in self.running if seq.status is SeqStatus.RUNNING]

    def remove_finished_waiting(self) -> None:
        """O(waiting): only after aborts."""
        self.waiting.remove_finished()
