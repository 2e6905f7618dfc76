"""The running sequences' share of a step, preempting from the back of the running
list when blocks run out. Two orders (`--batching-policy`):

* decode_first (`schedule_decode_first`): every decode gets its token, then the
  running prefills get chunks of what is left of the step's budget;
* fcfs (`schedule`, the default): each sequence in policy order its next
  chunk (one token for a decode, up to the token budget for a prefill), so a
  prefill ahead of decodes can leave them nothing."""

from __future__ import annotations

from scheduler.batch import Batch, next_chunk
from scheduler.block_manager import BlockManager
from scheduler.preemption import Preemption
from scheduler.sequence import Sequence
from scheduler.step_budget import StepBudget


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

    def schedule_decode_first(self, running: list[Sequence], batch: Batch, budget: StepBudget, cap: int) -> int:
        """Decodes first, then running prefills; returns the tokens left for joining (swapped and
        waiting) sequences, of `StepBudget.joinable`, and sets `batch.budget`.

        1. Every running decode (one token left to compute), best first, gets its token, up to
           `budget.max_tokens` (the worker's bound): one that needs a block preempts from the
           back of `running`, as `schedule` does, so a decode never waits for a prefill.
        2. The step's budget given the decodes (`StepBudget.tokens_for`): what the decodes left
           goes to running prefills (new, resumed or recomputing), best first, each at most
           `cap` tokens, so several partial prefills share a step. A prefill preempts only
           sequences behind it with nothing scheduled this step; then, short of blocks, it takes
           the tokens that fit and the batch is `short_of_blocks` (nothing joins this step).

        Progress: while the best prefill is short of blocks, nothing joins and the decodes that
        hold the blocks run to their end, so it gets them back."""
        decodes = 0
        i = 0
        while i < len(running) and decodes < budget.max_tokens:
            seq = running[i]
            if seq.compute_limit - seq.num_computed_tokens != 1:
                i += 1
                continue
            if not self._make_room(running, seq, 1, batch):
                break  # seq itself was the victim: everything behind it is gone too
            self.extend(seq, 1, batch)
            decodes += 1
            i += 1
        total, joinable = budget.tokens_for(decodes), budget.joinable(decodes)
        batch.budget = max(total, decodes)
        token_budget = total - decodes
        served = {seq.seq_id for seq, _, _ in batch.scheduled}
        i = 0
        while i < len(running) and token_budget > 0:
            seq = running[i]
            i += 1
            if seq.seq_id in served:
                continue
            num_tokens = next_chunk(seq.compute_limit - seq.num_computed_tokens, token_budget,
                                    self.enable_chunked_prefill, cap)
            if num_tokens <= 0:
                continue
            num_tokens = self._fit_prefill(running, seq, num_tokens, served, batch)
            if num_tokens > 0:
                self.extend(seq, num_tokens, batch)
                served.add(seq.seq_id)
                token_budget -= num_tokens
        return max(0, min(token_budget, joinable - (total - token_budget)))

    def _fit_prefill(self, running: list[Sequence], seq: Sequence, num_tokens: int, served: set[int],
                     batch: Batch) -> int:
        """Tokens of `num_tokens` that running prefill `seq` gets blocks for, preempting from the
        back of `running` only sequences with nothing scheduled (`served`: seq ids)."""
        bm = self.block_manager
        while not bm.can_append(seq.seq_id, num_tokens):
            victim = running[-1]
            if victim is seq or victim.seq_id in served:
                batch.short_of_blocks = True
                if not self.enable_chunked_prefill:
                    return 0
                lo, hi = 0, num_tokens - 1  # can_append is monotone in the tokens asked; 0 always fits
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if bm.can_append(seq.seq_id, mid):
                        lo = mid
                    else:
                        hi = mid - 1
                return lo
            running.pop()
            self.preemption.preempt(victim, "kv_cache_full", batch)
        return num_tokens

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
