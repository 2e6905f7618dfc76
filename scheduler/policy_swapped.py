"""Swap-in: sequences preempted by swap come back before any waiting one is admitted."""

from __future__ import annotations

from scheduler.batch import Batch, next_chunk
from scheduler.block_manager import BlockManager
from scheduler.seq_queue import SeqQueue
from scheduler.sequence import SeqStatus


class SwappedPolicy:
    """Brings sequences back from the head of `swapped` (the policy's queue) in policy order,
    stopping at the first that does not fit; a swap-in keeps the watermark free unless
    nothing else runs."""

    def __init__(self, block_manager: BlockManager, swapped: SeqQueue, *, max_num_seqs: int,
                 enable_chunked_prefill: bool, chunk_cap: int = 0) -> None:
        self.block_manager = block_manager
        self.swapped = swapped
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.chunk_cap = chunk_cap  # tokens per sequence per step (0: none but the budget)

    def swap_in(self, batch: Batch, token_budget: int, seats: int | None = None) -> int:
        """Swap in while tokens, sequences (`seats`, default `max_num_seqs`) and blocks allow;
        returns the tokens left of `token_budget`."""
        bm = self.block_manager
        while self.swapped and token_budget > 0:
            seq = self.swapped.peek()
            room, busy = batch.has_room_for(1 + len(seq.children), seats or self.max_num_seqs)
            num_tokens = next_chunk(seq.compute_limit - seq.num_computed_tokens, token_budget,
                                    self.enable_chunked_prefill, self.chunk_cap)
            if not room or num_tokens <= 0 or not bm.can_swap_in(seq.seq_id, num_tokens, use_watermark=busy):
                break
            self.swapped.pop()
            seq.block_table, pairs = bm.swap_in(seq.seq_id)
            batch.swap_in.extend(pairs)
            new_blocks, _ = bm.append_slots(seq.seq_id, num_tokens)  # a swapped-in table shares no partial block
            seq.status = SeqStatus.RUNNING
            batch.join(seq)
            batch.swapped_in.append(seq)
            batch.scheduled.append((seq, num_tokens, new_blocks))
            token_budget -= num_tokens
        return token_budget
