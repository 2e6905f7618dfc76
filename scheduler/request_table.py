"""The requests in flight and their sequences: intake, aborts, and finishing a sequence."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from scheduler.admission import check_admission
from scheduler.beam_search import new_group
from scheduler.block_manager import BlockManager
from scheduler.policy import BatchPolicy
from scheduler.sequence import Request, Sequence, SeqStatus
from shared.logging import get_logger
from shared.protocol import AddRequest, FinishReason, RequestRejected, TokenDelta
from shared.validation import Limits, Rejected, stop_token_ids

log = get_logger("scheduler")

_STOP = FinishReason.STOP.value
_ABORT = FinishReason.ABORT.value

# Totals since start. requests_finished counts every way of finishing,
# aborted (by a client) and failed (by a worker error) included.
REQUEST_COUNTERS = ("requests_finished", "requests_aborted", "requests_failed", "requests_rejected")

Outputs = list[tuple[bytes, TokenDelta]]  # (frontend identity, delta)


class RequestTable:
    """Owns every request in flight (at least one sequence unfinished) and every unfinished
    sequence, by id. A sequence is queued with the policy when it is admitted here and leaves
    every list (the policy's, the block manager's, the worker's via `release`) in `finish`.

    `release(seq)`: tells the worker to drop `seq` (scheduler/step_planner.py)."""

    def __init__(self, policy: BatchPolicy, block_manager: BlockManager, *, release: Callable[[Sequence], None],
                 limits: Limits, eos_token_ids: Iterable[int], max_waiting: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.block_manager = block_manager
        self.release = release
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_waiting = max_waiting  # sequences queued for admission, preempted ones included
        self._requests: dict[str, Request] = {}
        self._seqs: dict[int, Sequence] = {}
        self._next_seq_id = 0  # in arrival order: it breaks ties in policy order
        self.counters = dict.fromkeys(REQUEST_COUNTERS, 0)
        self._clock = clock  # stamps Request.received_at

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def sequence(self, seq_id: int) -> Sequence | None:
        """An unfinished sequence by id."""
        return self._seqs.get(seq_id)

    def unfinished(self) -> dict[int, Sequence]:
        """Every unfinished sequence by id (read it, never change it)."""
        return self._seqs

    # -- intake --------------------------------------------------------------------

    def add(self, msg: AddRequest, frontend: bytes, grammar: Any = None) -> RequestRejected | None:
        """Queue `msg`, or reject it at once (and log `request.rejected`). `grammar`: the
        `CompiledGrammar` of a structured request (each output gets its own matcher; raises
        GrammarError when a resubmitted output's tokens do not match it)."""
        try:
            max_tokens = check_admission(msg, self.limits, in_flight=msg.request_id in self._requests,
                                         num_waiting=len(self.policy.waiting), max_waiting=self.max_waiting)
        except Rejected as r:
            self.counters["requests_rejected"] += 1
            log.info("request.rejected", request_id=msg.request_id, code=r.code.value, reason=r.message,
                     **({"trace_id": msg.trace_id} if msg.trace_id else {}))
            return RequestRejected(msg.request_id, r.code.value, r.message)
        params = msg.params
        request = Request(request_id=msg.request_id, prompt_token_ids=msg.prompt_token_ids, params=params,
                          arrival_time=msg.arrival_time, priority=msg.priority, frontend=frontend,
                          max_tokens=max_tokens, stop_token_ids=frozenset(stop_token_ids(params, self.eos_token_ids)),
                          trace_id=msg.trace_id, received_at=self._clock())
        resumed, done = msg.output_token_ids, set(msg.finished_outputs)
        num_seqs = params.n
        if params.use_beam_search:
            # One sequence, the prompt: beams fork from it. Nothing was streamed, so a resubmission
            # (after a scheduler restart) starts the search again from the prompt.
            request.beam, num_seqs, resumed, done = new_group(request, self.limits.max_model_len), 1, [], set()
        # Matchers first: one that raises (GrammarError) leaves nothing half added.
        matchers = [grammar.matcher(resumed[i] if i < len(resumed) else []) if grammar and i not in done else None
                    for i in range(num_seqs)]
        for index in range(num_seqs):
            generated = resumed[index] if index < len(resumed) else []
            seq = Sequence(self._next_seq_id, request, index, list(msg.prompt_token_ids) + list(generated))
            seq.grammar = matchers[index]
            self._next_seq_id += 1
            request.seqs.append(seq)
            if index in done:  # ended before a scheduler restart: nothing to run
                seq.status = SeqStatus.FINISHED
                continue
            self._seqs[seq.seq_id] = seq
        parent = request.seqs[0]
        if request.is_finished():
            return None
        if any(resumed) or done:  # a resubmission: each output goes on from its own tokens
            for seq in request.seqs:
                if seq.status is not SeqStatus.FINISHED:
                    self.policy.enqueue(seq)
        elif num_seqs > 1 and request.prompt_len > 1:
            # One prompt prefill for all n outputs: the others fork from output 0.
            parent.children = request.seqs[1:]
            for child in parent.children:
                child.status = SeqStatus.FORK_PENDING
            self.policy.enqueue(parent)
        else:
            for seq in request.seqs:
                self.policy.enqueue(seq)
        self._requests[msg.request_id] = request
        return None

    # -- ending early ----------------------------------------------------------------

    def abort(self, request_ids: Iterable[str], finish_reason: str = _ABORT) -> Outputs:
        """Finish every unfinished sequence of these requests now, freeing their
        blocks; unknown ids (already finished, never seen) are ignored.
        Returns (frontend identity, finishing delta without tokens) per sequence."""
        outputs = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            self.counters["requests_aborted" if finish_reason == _ABORT else "requests_failed"] += 1
            beams = request.beam is not None and request.params.n
            for seq in request.seqs:
                if seq.status is not SeqStatus.FINISHED:
                    self.finish(seq)
                    if not beams:
                        delta = TokenDelta(request_id, seq.output_index, [], finish_reason, seq.num_preemptions)
                        outputs.append((request.frontend, delta))
            # A beam search's frontend waits for its n outputs, whatever its beams were.
            outputs.extend((request.frontend, TokenDelta(request_id, i, [], finish_reason)) for i in range(beams or 0))
        if outputs:
            self.policy.remove_finished()
        return outputs

    def finish_outputs(self, outputs: Iterable[tuple[str, int]]) -> Outputs:
        """Finish single outputs, as (request id, output index), with reason "stop" (a stop string
        ended one of n outputs): frees their blocks now. Unknown or finished ones are ignored."""
        finished = []
        for request_id, index in outputs:
            request = self._requests.get(request_id)
            # A beam search has no stop strings (refused at validation) and its beams are no outputs.
            if request is None or request.beam is not None or not 0 <= index < len(request.seqs):
                continue
            seq = request.seqs[index]
            if seq.status is not SeqStatus.FINISHED:
                self.finish(seq)
                finished.append((request.frontend, TokenDelta(request_id, index, [], _STOP, seq.num_preemptions)))
        if finished:
            self.policy.remove_finished()
        return finished

    def add_sequence(self, request: Request, token_ids: list[int]) -> Sequence:
        """A new sequence of `request` in flight (a forked beam), waiting; the caller places it."""
        seq = Sequence(self._next_seq_id, request, 0, token_ids)
        self._next_seq_id += 1
        request.seqs.append(seq)
        self._seqs[seq.seq_id] = seq
        return seq

    def ids_of_frontend(self, frontend: bytes) -> list[str]:
        """Request ids of one frontend. O(requests in flight): only on a disconnect."""
        return [rid for rid, request in self._requests.items() if request.frontend == frontend]

    def ids(self) -> list[str]:
        return list(self._requests)

    # -- finishing -----------------------------------------------------------------

    def finish(self, seq: Sequence) -> None:
        """Free `seq` now; the caller removes it from the policy's lists."""
        seq.status = SeqStatus.FINISHED
        bm = self.block_manager
        if bm.has_table(seq.seq_id) or bm.is_swapped(seq.seq_id):
            bm.free(seq.seq_id)
        self.release(seq)
        del self._seqs[seq.seq_id]
        request = seq.request
        if request.is_finished():
            del self._requests[request.request_id]
            self.counters["requests_finished"] += 1
