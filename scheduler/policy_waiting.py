"""Admission from the waiting queue: new sequences, and those preempted by recompute.

Full blocks already in the prefix cache are reused, not computed."""

from __future__ import annotations

from scheduler.batch import Batch, next_chunk
from scheduler.block_manager import BlockManager
from scheduler.seq_queue import SeqQueue
from scheduler.sequence import Sequence, SeqStatus


class WaitingPolicy:
    """Admits from the head of `waiting` (the policy's queue) in policy order.

    FCFS: admission stops at the first sequence that does not fit rather than
    let later ones overtake it, so the head is overtaken by nothing and the
    running set drains until it fits. An admission keeps the watermark free
    unless nothing else runs."""

    def __init__(self, block_manager: BlockManager, waiting: SeqQueue, *, max_num_seqs: int,
                 enable_chunked_prefill: bool, chunk_cap: int = 0) -> None:
        self.block_manager = block_manager
        self.waiting = waiting
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.chunk_cap = chunk_cap  # tokens per sequence per step (0: none but the budget)

    def admit(self, batch: Batch, token_budget: int, seats: int | None = None) -> None:
        """Admit while sequences (`seats`, default `max_num_seqs`), tokens (`token_budget`) and
        blocks allow."""
        bm = self.block_manager
        while self.waiting and token_budget > 0:
            seq = self.waiting.peek()
            room, busy = batch.has_room_for(1 + len(seq.children), seats or self.max_num_seqs)
            limit = seq.compute_limit
            # At least one token is computed, so the step ends with logits to sample.
            # Prompt logprobs need every prompt position computed once: no cache hit for them.
            max_hit_blocks = 0 if _wants_prompt_logprobs(seq) else (limit - 1) // bm.block_size
            hit = bm.find_cached_prefix(seq.token_ids, max_hit_blocks)
            num_cached = hit.num_tokens(bm.block_size)
            num_tokens = next_chunk(limit - num_cached, token_budget, self.enable_chunked_prefill, self.chunk_cap)
            if not room or num_tokens <= 0 or not bm.can_allocate(num_cached + num_tokens, hit, use_watermark=busy):
                break
            self.waiting.pop()
            seq.block_table = bm.allocate(seq.seq_id, num_cached + num_tokens, hit)
            seq.num_computed_tokens = num_cached
            seq.status = SeqStatus.RUNNING
            batch.prefix_queried_tokens += seq.num_tokens
            batch.prefix_hit_tokens += num_cached
            batch.join(seq)
            batch.admitted.append(seq)
            batch.scheduled.append((seq, num_tokens, []))
            token_budget -= num_tokens


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    """Only output 0 returns them, on its first prefill."""
    return (seq.request.params.prompt_logprobs is not None and seq.output_index == 0
            and seq.num_output_tokens == 0)
