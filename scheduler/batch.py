"""One step's decisions, as the policy (scheduler/policy.py) builds them, and the
rule every part of it uses to size a prefill chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scheduler.block_manager import BlockPairs
from scheduler.sequence import Sequence

PreemptionMode = Literal["recompute", "swap"]


def next_chunk(remaining: int, token_budget: int, enable_chunked_prefill: bool, cap: int = 0) -> int:
    """Tokens to compute now of `remaining` (tokens) within `token_budget` (tokens) and, with
    chunked prefill, at most `cap` (tokens per sequence per step; 0: no cap); 0 when they must
    wait for a bigger budget (without chunked prefill a prefill is never split, nor capped)."""
    if enable_chunked_prefill and cap > 0:
        token_budget = min(token_budget, cap)
    if remaining <= token_budget:
        return remaining
    return token_budget if enable_chunked_prefill else 0


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
    # decode_first: a running prefill got fewer tokens than its chunk for want of free blocks,
    # so nothing joins this step (a joiner would take the blocks it waits for).
    short_of_blocks: bool = False
    budget: int = 0  # tokens this step was allowed (decodes included)

    @property
    def num_tokens(self) -> int:
        return sum(num for _, num, _ in self.scheduled)

    def split_tokens(self) -> tuple[int, int]:
        """(decode tokens, prefill tokens) scheduled. A decode computes the one token its
        sequence does not have KV for yet (progress counts are still the step's start)."""
        decode = sum(1 for seq, num, _ in self.scheduled if num == 1 and seq.num_computed_tokens + 1 == seq.num_tokens)
        return decode, self.num_tokens - decode

    def has_room_for(self, joining: int, max_num_seqs: int) -> tuple[bool, bool]:
        """(may `joining` more sequences run, does anything else run). Outputs
        still to be forked count as running: they will be, after the prefill."""
        busy = self.occupied
        return busy == 0 or busy + joining <= max_num_seqs, busy > 0

    def join(self, seq: Sequence) -> None:
        """`seq` (and the outputs it will fork) runs from this step on."""
        self.occupied += 1 + len(seq.children)
