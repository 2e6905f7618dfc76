"""What the scheduler tracks per request and per generated output (sequence).

A request with `params.n == k` has k sequences, one per output index. Output 0
(the parent) prefills the prompt but its last token; then the other k - 1 are
forked from it, sharing its blocks, and each computes the last prompt token
itself, sampling its own first token. Lengths are in tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks; queued in policy order
    RUNNING = "running"  # holds KV blocks for num_computed_tokens (plus this step's tokens)
    SWAPPED = "swapped"  # its KV for num_computed_tokens sits in host blocks; queued to come back
    FORK_PENDING = "fork_pending"  # output k > 0 waiting for its parent's prompt prefill
    BEAM_PARKED = "beam_parked"  # a beam whose candidates are in, out of every queue until its group selects
    FINISHED = "finished"  # done, aborted or failed; holds nothing


@dataclass(eq=False, slots=True)
class Request:
    """One `AddRequest`, as admitted. `max_tokens` is resolved: never None."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # seconds since the epoch, from the frontend
    priority: int  # lower runs first
    frontend: bytes  # routing identity of the frontend that sent it
    max_tokens: int  # generated tokens at most, per sequence
    stop_token_ids: frozenset[int]  # EOS (unless ignore_eos) and params.stop_token_ids
    seqs: list[Sequence] = field(default_factory=list)
    trace_id: str = ""  # from the client's traceparent: logged with each of its events ("" = none)
    # The scheduler's clock (`Scheduler`'s, monotonic seconds): receipt, first step scheduling
    # any of its sequences, first token sampled by any. They give TokenDelta.queue_time_s/prefill_time_s.
    received_at: float = 0.0
    first_scheduled_at: float | None = None
    first_token_at: float | None = None
    beam: Any = None  # its `BeamGroup` (scheduler/beam_group.py) when params.use_beam_search

    def log_fields(self) -> dict[str, str]:
        """`trace_id` for its events, when it has one (docs/events.md: `trace_id?`)."""
        return {"trace_id": self.trace_id} if self.trace_id else {}

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def is_finished(self) -> bool:
        return all(seq.status is SeqStatus.FINISHED for seq in self.seqs)


@dataclass(eq=False, slots=True)
class Sequence:
    """One output of a request: its tokens, progress and KV blocks.

    `token_ids` is the prompt followed by every generated token; the first
    `num_computed_tokens` of them have KV in the cache (0 while waiting: a
    sequence preempted by recompute keeps its generated tokens, and prefix
    caching may give back some of its KV at admission; kept while swapped).

    `children` are the outputs still to be forked from this one (pending
    sequences of the same request): while there are any, it computes no
    further than `compute_limit`, the prompt but its last token.

    `block_table` is the BlockManager's live table for this sequence (read it,
    never change it); empty while the sequence holds no blocks.

    `crashes` > 0 makes it a suspect, run alone until it samples a token.

    `grammar` is its structured-output matcher (an llguidance `LLMatcher`, which has accepted
    every generated token), or None when unconstrained (scheduler/grammar_masks.py).

    `on_worker` is True between the step that sends this sequence as a
    `NewSeq` and the step whose `finished_seq_ids` tells the worker to drop it.
    """

    seq_id: int
    request: Request
    output_index: int
    token_ids: list[int]
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)
    on_worker: bool = False
    children: list[Sequence] = field(default_factory=list)
    crashes: int = 0  # worker failures in a row with this sequence in flight (scheduler/isolation.py)
    grammar: Any = None
    # Tokens the scheduler appended (a beam's chosen token) that the worker, holding it, has not got:
    # the next ScheduledSeq carries them (scheduler/step_planner.py).
    pending_tokens: int = 0
    # Speculative decoding (scheduler/spec_decode.py): the tokens proposed for the step in flight
    # (their KV slots are reserved after the known tokens; empty between steps), and the length
    # (blocks) the worker must truncate this sequence's table to before its next new blocks (-1: none).
    spec_token_ids: list[int] = field(default_factory=list)
    worker_table_len: int = -1
    spec_num_draft: int = 0  # draft-model method: slots reserved for the worker's draft tokens instead
    spec_proposed: int = 0  # totals over the output's life (request.finished reports them)
    spec_accepted: int = 0
    # Recent acceptance (accepted / proposed, exponentially averaged, 1.0 until it speculates):
    # scales its proposal length. Lost on nothing that matters: a fresh 1.0 is merely optimistic.
    spec_acceptance: float = 1.0
    spec_backoff_steps: int = 0  # eligible steps skipped since the last probe (scheduler/spec_decode.py)
    # Policy order, best first: priority, then arrival; the scheduler assigns
    # seq ids in arrival order, so the id breaks ties deterministically.
    sort_key: tuple[int, float, int] = field(init=False)

    def __post_init__(self) -> None:
        self.sort_key = (self.request.priority, self.request.arrival_time, self.seq_id)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def compute_limit(self) -> int:
        """Tokens this sequence may compute before something else must happen:
        the fork point while it has children to fork, else all it knows."""
        return self.request.prompt_len - 1 if self.children else len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.prompt_len
