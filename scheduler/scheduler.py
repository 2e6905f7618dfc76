"""The scheduler's core: requests in, step plans out, sampled tokens back in.

Torch-free and socket-free: `scheduler/loop.py` moves the messages; this class
decides. Call order per step: `schedule()`, send the plan, then
`update(plan, result)` with the worker's `StepResult`, before the next
`schedule()`. `add_request` and `abort` may come at any time in between.
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.admission import Limits, Rejected, check_request
from scheduler.block_manager import BlockManager
from scheduler.invariants import check_scheduler_invariants
from scheduler.policy import BatchPolicy
from scheduler.sequence import Request, Sequence, SeqStatus
from shared.config import ServerConfig
from shared.logging import get_logger
from shared.protocol import (AddRequest, ErrorCode, FinishReason, NewSeq, RequestRejected, ScheduledSeq, StepPlan,
                             StepResult, TokenDelta)

_log = get_logger("scheduler")

_STOP = FinishReason.STOP.value
_LENGTH = FinishReason.LENGTH.value
_ABORT = FinishReason.ABORT.value

# Totals since start. requests_finished counts every way of finishing,
# aborted (by a client) and failed (by a worker error) included.
_COUNTERS = ("requests_finished", "requests_aborted", "requests_failed", "requests_rejected", "preemptions",
             "preemptions_recompute", "preemptions_swap", "tokens_generated", "steps", "prefix_cache_queried_tokens",
             "prefix_cache_hit_tokens", "blocks_swapped_out", "blocks_swapped_in", "blocks_copied", "partial_prefills")


class Scheduler:
    """Block tables, admission, continuous batching and preemption for one model.

    Sizes come from the workers' handshake: `num_device_blocks` KV blocks of
    `block_size` tokens, `num_host_blocks` blocks of host swap space;
    `max_model_len` tokens per sequence.

    The worker is told changes, not snapshots: a sequence entering the running
    set (admitted, swapped in, forked) is sent once as a `NewSeq` with its whole
    table and its `num_computed_tokens` (prefix-cache hits, swapped-in KV);
    then only its new block ids. A sequence whose last block was replaced by a
    copy is sent whole again (the worker replaces a known id). A sequence the
    worker holds is named once in `finished_seq_ids` when it finishes, is
    aborted or is preempted. Swap-outs, swap-ins and copies ride in the plan of
    the step that needs them.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        num_device_blocks: int,
        block_size: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: list[int],
        num_host_blocks: int = 0,
    ) -> None:
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_batched_tokens = config.scheduler.resolved_max_num_batched_tokens(max_model_len)
        self.max_waiting = config.scheduler.max_waiting  # sequences queued for admission, preempted ones included
        self.block_manager = BlockManager(num_device_blocks, block_size, num_host_blocks=num_host_blocks,
                                          enable_prefix_caching=config.scheduler.enable_prefix_caching)
        self.policy = BatchPolicy(
            self.block_manager,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=config.scheduler.enable_chunked_prefill,
            preemption_mode=config.scheduler.preemption_mode,
            on_preempt=self._on_preempt,
        )
        self._limits = Limits(max_model_len, vocab_size, num_device_blocks, block_size, self.max_num_batched_tokens,
                              config.scheduler.enable_chunked_prefill)
        self._requests: dict[str, Request] = {}  # in flight: at least one sequence unfinished
        self._seqs: dict[int, Sequence] = {}  # unfinished sequences
        self._next_seq_id = 0
        self._next_step_id = 0
        self._in_flight: StepPlan | None = None  # planned, its result not yet applied
        self._to_drop: list[int] = []  # seq ids for the next plan's finished_seq_ids
        self._counters = dict.fromkeys(_COUNTERS, 0)

    # -- requests ------------------------------------------------------------

    def add_request(self, msg: AddRequest, frontend: bytes) -> RequestRejected | None:
        """Queue `msg`, or reject it at once (and log `request.rejected`)."""
        try:
            if msg.request_id in self._requests:
                raise Rejected(ErrorCode.INVALID_REQUEST, f"request id {msg.request_id!r} is already in flight")
            if len(self.policy.waiting) >= self.max_waiting:  # backpressure: a bounded queue, never silence
                raise Rejected(ErrorCode.OVERLOADED, f"{len(self.policy.waiting)} sequences are waiting already "
                                                     f"(max_waiting {self.max_waiting}): retry later")
            max_tokens = check_request(msg, self._limits)
            if len(msg.output_token_ids) > msg.params.n or any(len(t) >= max_tokens for t in msg.output_token_ids):
                raise Rejected(ErrorCode.INVALID_REQUEST, "output_token_ids: more outputs than n, or one that "
                                                          "already reached max_tokens")
        except Rejected as r:
            self._counters["requests_rejected"] += 1
            _log.info("request.rejected", request_id=msg.request_id, code=r.code.value, reason=r.message)
            return RequestRejected(msg.request_id, r.code.value, r.message)

        params = msg.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        request = Request(
            request_id=msg.request_id,
            prompt_token_ids=msg.prompt_token_ids,
            params=params,
            arrival_time=msg.arrival_time,
            priority=msg.priority,
            frontend=frontend,
            max_tokens=max_tokens,
            stop_token_ids=frozenset(stop_ids),
        )
        resumed, done = msg.output_token_ids, set(msg.finished_outputs)
        for index in range(params.n):
            generated = resumed[index] if index < len(resumed) else []
            seq = Sequence(self._next_seq_id, request, index, list(msg.prompt_token_ids) + list(generated))
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
        elif params.n > 1 and request.prompt_len > 1:
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

    def abort(self, request_ids: Iterable[str], finish_reason: str = _ABORT) -> list[tuple[bytes, TokenDelta]]:
        """Finish every unfinished sequence of these requests now, freeing their
        blocks; unknown ids (already finished, never seen) are ignored.
        Returns (frontend identity, finishing delta without tokens) per sequence."""
        outputs = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            self._counters["requests_aborted" if finish_reason == _ABORT else "requests_failed"] += 1
            for seq in request.seqs:
                if seq.status is not SeqStatus.FINISHED:
                    self._finish(seq)
                    delta = TokenDelta(request_id, seq.output_index, [], finish_reason, seq.num_preemptions)
                    outputs.append((request.frontend, delta))
        if outputs:
            self.policy.remove_finished()
        return outputs

    def stop_outputs(self, outputs: Iterable[tuple[str, int]]) -> list[tuple[bytes, TokenDelta]]:
        """Finish single outputs, as (request id, output index), with reason "stop" (a stop string
        ended one of n outputs): frees their blocks now. Unknown or finished ones are ignored."""
        finished = []
        for request_id, index in outputs:
            request = self._requests.get(request_id)
            if request is None or not 0 <= index < len(request.seqs):
                continue
            seq = request.seqs[index]
            if seq.status is not SeqStatus.FINISHED:
                self._finish(seq)
                finished.append((request.frontend, TokenDelta(request_id, index, [], _STOP, seq.num_preemptions)))
        if finished:
            self.policy.remove_finished()
        return finished

    def abort_frontend(self, frontend: bytes) -> list[str]:
        """Abort every request of a frontend that went away; returns their ids.
        O(requests in flight): only on a disconnect."""
        request_ids = [rid for rid, request in self._requests.items() if request.frontend == frontend]
        self.abort(request_ids)
        return request_ids

    def abort_all(self, finish_reason: str = _ABORT) -> list[tuple[bytes, TokenDelta]]:
        """Abort everything in flight (a drain that timed out, a fatal error)."""
        return self.abort(list(self._requests), finish_reason)

    # -- steps ---------------------------------------------------------------

    def has_work(self) -> bool:
        policy = self.policy
        return bool(policy.running or policy.waiting or policy.swapped)

    def schedule(self) -> StepPlan:
        """The next step. With work queued it schedules at least one sequence.

        A plan that schedules nothing (no work) is not a step: do not send it
        and do not `update()` it; its pending drops ride with the next plan."""
        if self._in_flight is not None:
            raise RuntimeError(f"step {self._in_flight.step_id} is in flight: update() it before scheduling again")
        batch = self.policy.schedule_next_batch()  # preemptions land in _to_drop via _on_preempt
        self._count_batch(batch)
        if not batch.scheduled:
            if batch.swap_out:  # cannot happen (a preemption leaves its sequence scheduled), but never lose one
                raise RuntimeError("a plan that swaps out but schedules nothing")
            return StepPlan(step_id=self._next_step_id, scheduled=[])
        for seq in batch.rebuilt:
            seq.on_worker = False  # its table changed in place: send it whole again
        scheduled, new_seqs = [], []
        for seq, num_tokens, new_blocks in batch.scheduled:
            if seq.on_worker:
                scheduled.append(ScheduledSeq(seq.seq_id, num_tokens, seq.num_computed_tokens, new_blocks))
                continue
            seq.on_worker = True
            scheduled.append(ScheduledSeq(seq.seq_id, num_tokens, seq.num_computed_tokens))
            new_seqs.append(NewSeq(seq.seq_id, list(seq.token_ids), seq.prompt_len, list(seq.block_table),
                                   seq.request.params, seq.output_index))
        plan = StepPlan(
            step_id=self._next_step_id,
            scheduled=scheduled,
            new_seqs=new_seqs,
            finished_seq_ids=self._to_drop,
            swap_out=batch.swap_out,
            swap_in=batch.swap_in,
            copy=batch.copy,
        )
        self._to_drop = []
        self._next_step_id += 1
        self._in_flight = plan
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> list[tuple[bytes, TokenDelta]]:
        """Apply the worker's sampled tokens; returns (frontend identity, delta)
        pairs: one per sequence that sampled a token. Sequences aborted while
        the step was in flight are skipped.

        Raises ValueError on a result that does not answer `plan` (a worker
        bug); `on_worker_restart()` then brings the state back to consistent."""
        if self._in_flight is None or plan.step_id != self._in_flight.step_id:
            raise ValueError(f"plan {plan.step_id} is not the step in flight")
        if result.step_id != plan.step_id or len(result.sampled) != len(plan.scheduled):
            raise ValueError(
                f"result of step {result.step_id} with {len(result.sampled)} tokens does not answer "
                f"step {plan.step_id} with {len(plan.scheduled)} sequences"
            )
        self._in_flight = None
        self._counters["steps"] += 1
        outputs = []
        any_finished = False
        for i, (work, token) in enumerate(zip(plan.scheduled, result.sampled)):
            seq = self._seqs.get(work.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed_tokens = work.num_computed_tokens + work.num_tokens
            self.block_manager.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.children and seq.num_computed_tokens >= seq.compute_limit:
                self.policy.fork_children(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                self._counters["partial_prefills"] += 1
                continue  # a partial prefill chunk samples nothing
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"step {plan.step_id}: sequence {seq.seq_id} sampled {token}, outside the vocabulary")
            seq.token_ids.append(token)
            self._counters["tokens_generated"] += 1
            if seq.crashes:
                self.policy.isolation.clear(seq)
            delta = TokenDelta(seq.request_id, seq.output_index, [token])
            _attach_logprobs(delta, result, i)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq)
                delta.finish_reason = reason
                delta.num_preemptions = seq.num_preemptions
                any_finished = True
            outputs.append((seq.request.frontend, delta))
        if any_finished:
            self.policy.remove_finished_running()
        return outputs

    def fail_step(self, plan: StepPlan) -> list[tuple[bytes, TokenDelta]]:
        """The worker failed the step in flight (`WorkerError`): finish the
        requests it scheduled with reason "error"; the others carry on."""
        if self._in_flight is None or plan.step_id != self._in_flight.step_id:
            raise ValueError(f"plan {plan.step_id} is not the step in flight")
        self._in_flight = None
        failed = dict.fromkeys(self._seqs[w.seq_id].request_id for w in plan.scheduled if w.seq_id in self._seqs)
        return self.abort(failed, FinishReason.ERROR.value)

    def on_worker_restart(self, crashed: StepPlan | None = None) -> list[tuple[bytes, TokenDelta]]:
        """The worker lost its state (it restarted or reconnected): forget the
        step in flight and preempt every running sequence by recompute, so the
        next plans resend everything as `NewSeq`s; swapped sequences recompute
        too and the prefix cache is forgotten (both caches died with the
        worker). Nothing is lost, but: `crashed` is the step in flight when the
        worker died or hung, whose sequences become suspects; a request with one
        at the crash limit finishes with "error" (scheduler/isolation.py). Returns
        those finishing deltas."""
        convicted = []
        if crashed is not None:
            in_flight = [self._seqs[work.seq_id] for work in crashed.scheduled if work.seq_id in self._seqs]
            convicted = self.policy.isolation.blame(in_flight)
        self._in_flight = None
        self.policy.preempt_all(cause="worker_restart")
        for seq in self._seqs.values():
            seq.on_worker = False
        self._to_drop = []  # a fresh worker holds nothing to drop
        return self.abort(dict.fromkeys(seq.request_id for seq in convicted), FinishReason.ERROR.value)

    # -- internals -----------------------------------------------------------

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        """Checked after appending `token` to `seq`. EOS and stop ids end it only from generated
        token number min_tokens on (0-based): the worker masks them before that."""
        if token in seq.request.stop_token_ids and seq.num_output_tokens > seq.request.params.min_tokens:
            return _STOP
        if seq.num_output_tokens >= seq.request.max_tokens or seq.num_tokens >= self.max_model_len:
            return _LENGTH
        return None

    def _finish(self, seq: Sequence) -> None:
        """Free `seq` now; the caller removes it from the policy's lists."""
        seq.status = SeqStatus.FINISHED
        bm = self.block_manager
        if bm.has_table(seq.seq_id) or bm.is_swapped(seq.seq_id):
            bm.free(seq.seq_id)
        self._release_from_worker(seq)
        del self._seqs[seq.seq_id]
        request = seq.request
        if request.is_finished():
            del self._requests[request.request_id]
            self._counters["requests_finished"] += 1

    def _on_preempt(self, seq: Sequence, cause: str, mode: str) -> None:
        """Called by the policy before the victim's blocks are freed or swapped."""
        self._counters["preemptions"] += 1
        self._counters[f"preemptions_{mode}"] += 1
        bm = self.block_manager
        _log.info(
            "request.preempted",
            request_id=seq.request_id,
            seq_id=seq.seq_id,
            mode=mode,
            cause=cause,
            tokens_to_recompute=seq.num_tokens if mode == "recompute" else 0,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            host_blocks_used=bm.num_used_host_blocks,
            host_blocks_total=bm.num_host_blocks,
        )
        self._release_from_worker(seq)

    def _count_batch(self, batch) -> None:
        c = self._counters
        c["prefix_cache_queried_tokens"] += batch.prefix_queried_tokens
        c["prefix_cache_hit_tokens"] += batch.prefix_hit_tokens
        c["blocks_swapped_out"] += len(batch.swap_out)
        c["blocks_swapped_in"] += len(batch.swap_in)
        c["blocks_copied"] += len(batch.copy)

    def _release_from_worker(self, seq: Sequence) -> None:
        if seq.on_worker:
            seq.on_worker = False
            self._to_drop.append(seq.seq_id)

    # -- introspection -------------------------------------------------------

    def get_sequence(self, seq_id: int) -> Sequence | None:
        """An unfinished sequence by id (for tests and debugging)."""
        return self._seqs.get(seq_id)

    def stats(self) -> dict[str, int]:
        """Gauges (sequences running/waiting/swapped, device and host KV blocks)
        and the `_COUNTERS` totals; units in the names (blocks, tokens)."""
        bm, policy = self.block_manager, self.policy
        return {
            "running": len(policy.running),
            "waiting": len(policy.waiting),
            "swapped": len(policy.swapped),
            "requests_in_flight": len(self._requests),
            **self._counters,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_cached": bm.num_cached_blocks,
            "kv_blocks_allocated": bm.blocks_allocated,
            "kv_blocks_evicted": bm.blocks_evicted,
            "host_blocks_used": bm.num_used_host_blocks,
            "host_blocks_total": bm.num_host_blocks,
        }

    def check_invariants(self) -> None:
        """O(everything): for tests (scheduler/invariants.py says what is checked)."""
        check_scheduler_invariants(self, self._seqs, self._in_flight)


def _attach_logprobs(delta: TokenDelta, result: StepResult, i: int) -> None:
    """Copy row `i`'s logprobs (if the worker sent any) onto its delta."""
    if result.logprobs and result.logprobs[i] is not None:
        delta.logprobs = [result.logprobs[i]]
    if result.prompt_logprobs and result.prompt_logprobs[i]:
        delta.prompt_logprobs = result.prompt_logprobs[i]
