"""Which sequences run each step: FCFS by (priority, arrival), continuous
batching, chunked prefill, preemption by recompute or swap, fork for n > 1.

Pure policy over the block manager: no sockets, no protocol messages, no
logging (the scheduler turns a `Batch` into a `StepPlan` and logs preemptions
through the `on_preempt` hook).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Literal

from scheduler.block_manager import BlockManager, BlockPairs
from scheduler.isolation import Isolation
from scheduler.seq_queue import SeqQueue
from scheduler.sequence import Sequence, SeqStatus

_policy_order = attrgetter("sort_key")

PreemptionMode = Literal["recompute", "swap"]


@dataclass(slots=True)
class Batch:
    """One step's decisions.

    `scheduled` holds (sequence, tokens to compute from its `num_computed_tokens`,
    blocks appended to its table this step). A sequence the worker must receive
    whole (admitted, swapped in, forked, or `rebuilt`: its last block replaced
    by a copy) is sent with its whole table instead of the appended blocks.
    """

    scheduled: list[tuple[Sequence, int, list[int]]] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # from the waiting queue
    swapped_in: list[Sequence] = field(default_factory=list)
    rebuilt: list[Sequence] = field(default_factory=list)  # on the worker, table changed in place
    preempted: list[tuple[Sequence, PreemptionMode]] = field(default_factory=list)
    swap_out: BlockPairs = field(default_factory=list)  # (device, host)
    swap_in: BlockPairs = field(default_factory=list)  # (host, device)
    copy: BlockPairs = field(default_factory=list)  # (device, device)
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    occupied: int = 0  # sequences running or joining, outputs still to be forked included

    @property
    def num_tokens(self) -> int:
        return sum(num for _, num, _ in self.scheduled)


class BatchPolicy:
    """Owns the running list and the waiting and swapped queues; builds each step's batch.

    `running` is kept in policy order (best first), so the most important
    sequences are served first and the preemption victim (lowest priority,
    then latest arrival) is always `running[-1]`.

    Order within a step: running sequences (each its next chunk: one token for
    a decode, up to the token budget for a prefill when chunked prefill is on);
    then, if nothing had to be preempted, swapped sequences come back; then,
    only once none is left swapped, waiting ones are admitted. Admissions and
    swap-ins keep the watermark free unless nothing else runs.

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
        on_preempt: Callable[[Sequence, str, PreemptionMode], None] = lambda seq, cause, mode: None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.preemption_mode = preemption_mode
        self.on_preempt = on_preempt  # (victim, cause, mode), called before its blocks move
        self.running: list[Sequence] = []
        self.waiting = SeqQueue()
        self.swapped = SeqQueue()
        self.isolation = Isolation()

    def enqueue(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def schedule_next_batch(self) -> Batch:
        batch = Batch()
        suspect = self.isolation.next_suspect()
        if suspect is not None and self._run_alone(suspect, batch):
            return batch
        token_budget = self._schedule_running(batch, self.max_num_batched_tokens)
        # Preempting means memory ran out this step: bringing anyone in now
        # would only evict someone else at the next block boundary.
        if not batch.preempted:
            batch.occupied = sum(1 + len(seq.children) for seq in self.running)
            token_budget = self._swap_in(batch, token_budget)
            if not self.swapped:
                self._admit_waiting(batch, token_budget)
        joined = batch.swapped_in + batch.admitted
        if joined:
            self.running.extend(joined)
            self.running.sort(key=_policy_order)
        return batch

    def _run_alone(self, seq: Sequence, batch: Batch) -> bool:
        """`seq`'s next chunk is the whole step; False if it has none (then the step is a
        normal one). Admission checked that it fits the cache on its own, so evicting the
        others always makes room."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        running = seq.status is SeqStatus.RUNNING
        num_tokens = self._chunk(seq.compute_limit - (seq.num_computed_tokens if running else 0), budget)
        if num_tokens <= 0:
            return False
        if running:
            self._evict_for(seq, lambda: bm.can_append(seq.seq_id, num_tokens), batch)
            new_blocks, copy = bm.append_slots(seq.seq_id, num_tokens)
            if copy is not None:
                batch.copy.append(copy)
                batch.rebuilt.append(seq)
            batch.scheduled.append((seq, num_tokens, new_blocks))
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
            self._preempt(victim, "isolation", batch)

    def _chunk(self, remaining: int, token_budget: int) -> int:
        """Tokens to compute of `remaining`; 0 when they must wait for a bigger budget."""
        if remaining <= token_budget:
            return remaining
        return token_budget if self.enable_chunked_prefill else 0

    def _schedule_running(self, batch: Batch, token_budget: int) -> int:
        """Give each running sequence its next chunk, best first, preempting
        from the back when blocks run out."""
        bm = self.block_manager
        i = 0
        while i < len(self.running) and token_budget > 0:
            seq = self.running[i]
            num_tokens = self._chunk(seq.compute_limit - seq.num_computed_tokens, token_budget)
            if num_tokens <= 0:
                i += 1
                continue
            if not self._make_room(seq, num_tokens, batch):
                break  # seq itself was the victim: everything behind it is gone too
            new_blocks, copy = bm.append_slots(seq.seq_id, num_tokens)
            if copy is not None:
                batch.copy.append(copy)
                batch.rebuilt.append(seq)
            batch.scheduled.append((seq, num_tokens, new_blocks))
            token_budget -= num_tokens
            i += 1
        return token_budget

    def _make_room(self, seq: Sequence, num_tokens: int, batch: Batch) -> bool:
        """Preempt from the back until `seq` can grow; False if `seq` went too."""
        while not self.block_manager.can_append(seq.seq_id, num_tokens):
            victim = self.running.pop()
            self._preempt(victim, "kv_cache_full", batch)
            if victim is seq:
                return False
        return True

    def _has_room_for(self, joining: int, batch: Batch) -> tuple[bool, bool]:
        """(may `joining` more sequences run, does anything else run). Outputs
        still to be forked count as running: they will be, after the prefill."""
        busy = batch.occupied
        return busy == 0 or busy + joining <= self.max_num_seqs, busy > 0

    def _join(self, seq: Sequence, batch: Batch) -> None:
        batch.occupied += 1 + len(seq.children)

    def _swap_in(self, batch: Batch, token_budget: int) -> int:
        """Bring swapped sequences back, best first, while tokens, sequences and blocks allow."""
        bm = self.block_manager
        while self.swapped and token_budget > 0:
            seq = self.swapped.peek()
            room, busy = self._has_room_for(1 + len(seq.children), batch)
            num_tokens = self._chunk(seq.compute_limit - seq.num_computed_tokens, token_budget)
            if not room or num_tokens <= 0 or not bm.can_swap_in(seq.seq_id, num_tokens, use_watermark=busy):
                break
            self.swapped.pop()
            seq.block_table, pairs = bm.swap_in(seq.seq_id)
            batch.swap_in.extend(pairs)
            new_blocks, _ = bm.append_slots(seq.seq_id, num_tokens)  # a swapped-in table shares no partial block
            seq.status = SeqStatus.RUNNING
            self._join(seq, batch)
            batch.swapped_in.append(seq)
            batch.scheduled.append((seq, num_tokens, new_blocks))
            token_budget -= num_tokens
        return token_budget

    def _admit_waiting(self, batch: Batch, token_budget: int) -> None:
        """Admit from the head of the queue while sequences, tokens and blocks
        allow; full blocks already in the prefix cache are reused, not computed."""
        bm = self.block_manager
        while self.waiting and token_budget > 0:
            seq = self.waiting.peek()
            room, busy = self._has_room_for(1 + len(seq.children), batch)
            limit = seq.compute_limit
            # At least one token is computed, so the step ends with logits to sample.
            # Prompt logprobs need every prompt position computed once: no cache hit for them.
            wants_prompt_logprobs = (seq.request.params.prompt_logprobs is not None and seq.output_index == 0
                                     and seq.num_output_tokens == 0)
            max_hit_blocks = 0 if wants_prompt_logprobs else (limit - 1) // bm.block_size
            hit = bm.find_cached_prefix(seq.token_ids, max_hit_blocks)
            num_cached = hit.num_tokens(bm.block_size)
            num_tokens = self._chunk(limit - num_cached, token_budget)
            # FCFS: stop at the first that does not fit rather than let later ones overtake it.
            if not room or num_tokens <= 0 or not bm.can_allocate(num_cached + num_tokens, hit, use_watermark=busy):
                break
            self.waiting.pop()
            seq.block_table = bm.allocate(seq.seq_id, num_cached + num_tokens, hit)
            seq.num_computed_tokens = num_cached
            seq.status = SeqStatus.RUNNING
            batch.prefix_queried_tokens += seq.num_tokens
            batch.prefix_hit_tokens += num_cached
            self._join(seq, batch)
            batch.admitted.append(seq)
            batch.scheduled.append((seq, num_tokens, []))
            token_budget -= num_tokens

    def _preempt(self, seq: Sequence, cause: str, batch: Batch | None) -> None:
        """Swap `seq` out when the mode says so and host blocks allow, else drop
        its KV to recompute later (its tokens are kept either way)."""
        bm = self.block_manager
        swap = self.preemption_mode == "swap" and batch is not None and bm.can_swap_out(seq.seq_id)
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
        self._to_waiting(seq)

    def _to_waiting(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.push(seq)

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
            self._preempt(seq, cause, None)
        for seq in self.swapped.drain():
            self.block_manager.free(seq.seq_id)
            self._to_waiting(seq)
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
