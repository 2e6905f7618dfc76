"""The running sequences' share of a step: each its next chunk (one token for a
decode, up to the token budget for a prefill), preempting from the back of the
running list when blocks run out."""

from __future__ import annotations

from scheduler.batch import Batch, next_chunk
from scheduler.block_manager import BlockManager
from scheduler.preemption import Preemption
from scheduler.sequence import Sequence


class RunningPolicy:
    """Serves `running` (the policy's list, best first) in order.

    Progress: the best running sequence is never its own victim while anything
    runs behind it, and admission guaranteed it fits the whole cache alone, so
    it always gets its chunk."""

    def __init__(self, block_manager: BlockManager, preemption: Preemption, *, enable_chunked_prefill: bool) -> None:
        self.block_manager = block_manager
        self.preemption = preemption
        self.enable_chunked_prefill = enable_chunked_prefill

    def schedule(self, running: list[Sequence], batch: Batch, token_budget: int) -> int:
        """Give each running sequence its next chunk, best first; returns the tokens left of
        `token_budget`. Victims are popped off the back of `running`."""
        i = 0
        while i < len(running) and token_budget > 0:
            seq = running[i]
            num_tokens = next_chunk(seq.compute_limit - seq.num_computed_tokens, token_budget,
                                    self.enable_chunked_prefill)
            if num_tokens <= 0:
                i += 1
                continue
            if not self._make_room(running, seq, num_tokens, batch):
                break  # seq itself was the victim: everything behind it is gone too
            self.extend(seq, num_tokens, batch)
            token_budget -= num_tokens
            i += 1
        return token_budget

    def extend(self, seq: Sequence, num_tokens: int, batch: Batch) -> None:
        """Reserve `num_tokens` more slots for running `seq` (room was made) and schedule them;
        a shared partial last block is copied first (copy-on-write)."""
        new_blocks, copy = self.block_manager.append_slots(seq.seq_id, num_tokens)
        if copy is not None:
            batch.copy.append(copy)
            batch.rebuilt.append(seq)
        batch.scheduled.append((seq, num_tokens, new_blocks))

    def _make_room(self, running: list[Sequence], seq: Sequence, num_tokens: int, batch: Batch) -> bool:
        """Preempt from the back until `seq` can grow; False if `seq` went too."""
        while not self.block_manager.can_append(seq.seq_id, num_tokens):
            victim = running.pop()
            self.preemption.preempt(victim, "kv_cache_full", batch)
            if victim is seq:
                return False
        return True
