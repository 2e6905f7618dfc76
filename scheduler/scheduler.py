"""The scheduler's core: requests in, step plans out, sampled tokens back in.

Torch-free and socket-free: `scheduler/loop.py` moves the messages; this class
decides. Call order per step: `schedule()`, send the plan, then `update(result)`
with the worker's `StepResult` (or `fail_step` / `on_worker_restart` when the
worker fails it), before the next `schedule()`. `add_request`, `abort` and
`finish_outputs` may come at any time in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from scheduler.beam_search import BeamSearch
from scheduler.block_manager import BlockManager
from scheduler.grammar_intake import Rejections
from scheduler.invariants import check_scheduler_invariants
from scheduler.policy import BatchPolicy
from scheduler.preempt_log import log_preempted
from scheduler.request_table import Outputs, RequestTable
from scheduler.sequence import Request, Sequence, SeqStatus
from scheduler.spec_decode import SpecDecoder
from scheduler.step_planner import StepPlanner
from scheduler.structured_output import StructuredOutput
from scheduler.token_outcome import append_tokens, attach_logprobs, time_first_token
from shared.config import SchedulerConfig
from shared.protocol import AddRequest, FinishReason, RequestRejected, StepMasks, StepPlan, StepResult, TokenDelta
from shared.validation import Limits

_ERROR = FinishReason.ERROR.value
_STEP_COUNTERS = ("preemptions", "preemptions_recompute", "preemptions_swap", "tokens_generated", "steps",
                  "partial_prefills")
# Every total since start, in the order stats() lists them; each is counted by one owner:
# RequestTable (requests_*), StepPlanner (prefix_cache_*, blocks_*) or this class (_STEP_COUNTERS).
_COUNTERS = ("requests_finished", "requests_aborted", "requests_failed", "requests_rejected", "preemptions",
             "preemptions_recompute", "preemptions_swap", "tokens_generated", "steps", "prefix_cache_queried_tokens",
             "prefix_cache_hit_tokens", "blocks_swapped_out", "blocks_swapped_in", "blocks_copied", "partial_prefills")


class Scheduler:
    """Block tables, admission, continuous batching and preemption for one model.

    Sizes come from the workers' handshake: `num_device_blocks` KV blocks of `block_size` tokens,
    `num_host_blocks` blocks of host swap space; `max_model_len` tokens per sequence. The rest is
    `config` (one place resolves derived settings: `SchedulerConfig.resolved_max_num_batched_tokens`).

    Owned here, one owner each: the requests and sequences (`RequestTable`), the
    running list and queues (`BatchPolicy`), the block tables (`BlockManager`), and
    the plan in flight with the worker's view of the sequences (`StepPlanner`,
    which says how plans carry changes, not snapshots). The loop asks `in_flight`.
    """

    def __init__(self, config: SchedulerConfig, *, num_device_blocks: int, block_size: int, max_model_len: int,
                 vocab_size: int, eos_token_ids: list[int], num_host_blocks: int = 0,
                 clock: Callable[[], float] = time.monotonic, wake: Callable[[], None] = lambda: None) -> None:
        # What any one sequence may use, as admission and the frontend check it (EngineInfo tells the frontend).
        self.limits = Limits(max_model_len, vocab_size, num_device_blocks, block_size,
                             config.resolved_max_num_batched_tokens(max_model_len), config.enable_chunked_prefill)
        self.block_manager = BlockManager(num_device_blocks, block_size, num_host_blocks=num_host_blocks,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.policy = BatchPolicy(self.block_manager, max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=self.limits.max_num_batched_tokens,
                                  enable_chunked_prefill=config.enable_chunked_prefill,
                                  preemption_mode=config.preemption_mode, on_preempt=self._on_preempt,
                                  batching_policy=config.batching_policy, target_tpot_ms=config.target_tpot_ms,
                                  chunk_cap=config.resolved_long_prefill_token_threshold(max_model_len))
        self._planner = StepPlanner()
        self._requests = RequestTable(self.policy, self.block_manager, release=self._planner.release,
                                      limits=self.limits, eos_token_ids=eos_token_ids, max_waiting=config.max_waiting,
                                      clock=clock)
        # Structured requests wait there for their grammar; `wake` (thread-safe) says one is ready.
        self.structured = StructuredOutput(vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                                           admit=self._requests.add, wake=wake)
        self._beams = BeamSearch(self.policy, self.block_manager, add_sequence=self._requests.add_sequence,
                                 finish=self._requests.finish, release=self._planner.release, clock=clock)
        self._spec = SpecDecoder.from_config(self.block_manager, config, max_model_len)
        self._counters = dict.fromkeys(_STEP_COUNTERS, 0)
        self._kv_blocks_used_peak = 0  # the most device blocks in use after any schedule(), since start
        self._clock = clock  # per-request timings only (Request.received_at ...): the first token's delta reports them

    # -- requests ------------------------------------------------------------

    def add_request(self, msg: AddRequest, frontend: bytes) -> RequestRejected | None:
        """Queue `msg`, or reject it at once (and log `request.rejected`). A structured request
        may wait for its grammar first (`admit_compiled`)."""
        if msg.params.structured_outputs is not None:
            return self.structured.add(msg, frontend)
        return self._requests.add(msg, frontend)

    def admit_compiled(self) -> Rejections:
        """Queue the structured requests whose grammar is now compiled; returns the rejections
        (grammars that failed) for their frontends."""
        return self.structured.admit_ready()

    def awaiting_grammar(self) -> int:
        """Requests waiting for their grammar: in flight, though no sequence of theirs exists yet."""
        return len(self.structured.intake)

    def abort(self, request_ids: Iterable[str], finish_reason: str = FinishReason.ABORT.value) -> Outputs:
        """Finish every unfinished sequence of these requests now, freeing their blocks; unknown
        ids are ignored. Returns (frontend identity, finishing delta without tokens) per sequence."""
        request_ids = list(request_ids)
        outputs = self._requests.abort(request_ids, finish_reason)
        for frontend, request_id, n in self.structured.intake.remove(request_ids):
            outputs.extend((frontend, TokenDelta(request_id, i, [], finish_reason)) for i in range(n))
        return outputs

    def finish_outputs(self, outputs: Iterable[tuple[str, int]]) -> Outputs:
        """Finish single outputs, as (request id, output index), with reason "stop" (a stop string
        ended one of n outputs): frees their blocks now. Unknown or finished ones are ignored."""
        return self._requests.finish_outputs(outputs)

    def abort_frontend(self, frontend: bytes) -> list[str]:
        """Abort every request of a frontend that went away; returns their ids.
        O(requests in flight): only on a disconnect."""
        request_ids = self._requests.ids_of_frontend(frontend) + self.structured.intake.ids_of_frontend(frontend)
        self.abort(request_ids)
        return request_ids

    def abort_all(self, finish_reason: str = FinishReason.ABORT.value) -> Outputs:
        """Abort everything in flight (a drain that timed out, a fatal error)."""
        return self.abort(self._requests.ids() + self.structured.intake.ids(), finish_reason)

    # -- steps ---------------------------------------------------------------

    @property
    def in_flight(self) -> StepPlan | None:
        """The plan sent and not yet answered (`update`) or failed; None between steps."""
        return self._planner.in_flight

    def has_work(self) -> bool:
        policy = self.policy
        return bool(policy.running or policy.waiting or policy.swapped)

    def schedule(self) -> StepPlan:
        """The next step. With work queued it schedules at least one sequence.

        A plan that schedules nothing (no work) is not a step: do not send it
        and do not `update()` it; its pending drops ride with the next plan."""
        if self.in_flight is not None:
            raise RuntimeError(f"step {self.in_flight.step_id} is in flight: update() it before scheduling again")
        self._beams.park_stragglers()  # a beam group waits for its missing beams holding nothing
        # Preemptions reach the planner's drops through _on_preempt.
        batch = self.policy.schedule_next_batch()
        now = None
        for seq, _, _ in batch.scheduled:
            if seq.request.first_scheduled_at is None:
                if now is None:
                    now = self._clock()
                seq.request.first_scheduled_at = now
        self.policy.step_budget.add_proposed(self._spec.attach(batch))  # proposals, slots; time model counts them
        # Blocks are taken only here, so a high-water mark per step is exact.
        self._kv_blocks_used_peak = max(self._kv_blocks_used_peak, self.block_manager.num_used_blocks)
        return self._planner.plan(batch)

    def step_masks(self, plan: StepPlan) -> StepMasks | None:
        """The grammar masks of `plan`'s constrained rows (None if it has none): computed after the
        plan was sent, while the worker runs its forward."""
        if not plan.masked_rows:
            return None
        seqs = [self._requests.sequence(plan.scheduled[row].seq_id) for row in plan.masked_rows]
        return self.structured.masks(plan, seqs)

    def update(self, result: StepResult, cycle_s: float | None = None) -> Outputs:
        """Apply the worker's sampled tokens for the step in flight; returns (frontend identity, delta)
        pairs: one per sequence that sampled a token. Sequences aborted while the step was in flight
        are skipped. The step-time model learns `cycle_s` (seconds between a sequence's tokens: the
        loop measures it) if given, else the worker's own `step_time_s`.

        Raises ValueError on a result that does not answer the step in flight (a worker
        bug); `on_worker_restart()` then brings the state back to consistent."""
        plan = self.in_flight
        if plan is None:
            raise ValueError(f"result of step {result.step_id}: no step is in flight")
        if result.step_id != plan.step_id or len(result.sampled) != len(plan.scheduled):
            raise ValueError(f"result of step {result.step_id} with {len(result.sampled)} tokens does not answer "
                             f"step {plan.step_id} with {len(plan.scheduled)} sequences")
        self._planner.complete()
        self._counters["steps"] += 1
        self.policy.observe_step(result.step_time_s if cycle_s is None else cycle_s, plan.step_id)
        outputs = []
        any_finished = False
        for i, (work, token) in enumerate(zip(plan.scheduled, result.sampled)):
            seq = self._requests.sequence(work.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            tokens = [token] + (result.extra_tokens[i] if result.extra_tokens else [])
            if work.spec_token_ids or work.num_draft_tokens:  # accepted proposals may enter the prefix cache
                seq.num_computed_tokens = self._spec.settle(seq, work, tokens)
                self.block_manager.mark_computed(seq.seq_id, seq.token_ids + tokens[:-1], seq.num_computed_tokens)
            else:
                seq.num_computed_tokens = work.num_computed_tokens + work.num_tokens
                self.block_manager.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.children and seq.num_computed_tokens >= seq.compute_limit:
                self.policy.fork_children(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                self._counters["partial_prefills"] += 1
                continue  # a partial prefill chunk samples nothing
            if seq.request.beam is not None:  # beams choose their tokens together (scheduler/beam_search.py)
                self._beams.report(seq, result.candidates[i] if result.candidates else None)
                continue
            if not all(0 <= t < self.limits.vocab_size for t in tokens):
                raise ValueError(f"step {plan.step_id}: sequence {seq.seq_id} sampled {tokens}, outside the vocabulary")
            if seq.crashes:
                self.policy.isolation.clear(seq)
            delta = TokenDelta(seq.request_id, seq.output_index, [])
            if seq.request.first_token_at is None:
                time_first_token(seq.request, delta, self._clock())
            reason = append_tokens(seq, delta, tokens, self.limits.max_model_len)
            self._counters["tokens_generated"] += len(delta.token_ids)
            attach_logprobs(delta, result, i)
            if reason is not None:
                self._requests.finish(seq)
                delta.finish_reason = reason
                delta.num_preemptions = seq.num_preemptions
                any_finished = True
            outputs.append((seq.request.frontend, delta))
        if any_finished:
            self.policy.remove_finished_running()
        return outputs + self._beams.advance()

    def fail_step(self, step_id: int) -> Outputs:
        """A worker failed step `step_id` (`WorkerError`): if it is the one in flight, finish the
        requests it scheduled with reason "error" (the others carry on) and returns their
        finishing deltas. A step no longer in flight (the group failed it already) changes nothing."""
        plan = self.in_flight
        if plan is None or plan.step_id != step_id:
            return []
        self._planner.complete()
        seqs = (self._requests.sequence(work.seq_id) for work in plan.scheduled)
        return self.abort(dict.fromkeys(seq.request_id for seq in seqs if seq is not None), _ERROR)

    def on_worker_restart(self, blame_in_flight: bool = False) -> Outputs:
        """The worker lost its state (it restarted or reconnected): forget the
        step in flight and preempt every running sequence by recompute, so the
        next plans resend everything as `NewSeq`s; swapped sequences recompute
        too and the prefix cache is forgotten (both caches died with the
        worker). Nothing is lost, but: with `blame_in_flight` (the worker died or
        hung with the step in flight) that step's sequences become suspects, and a
        request with one at the crash limit finishes with "error"
        (scheduler/isolation.py). Returns those finishing deltas."""
        plan = self.in_flight
        convicted = []
        if blame_in_flight and plan is not None:
            seqs = (self._requests.sequence(work.seq_id) for work in plan.scheduled)
            convicted = self.policy.isolation.blame([seq for seq in seqs if seq is not None])
        self.policy.preempt_all(cause="worker_restart")
        self._planner.forget_worker(self._requests.unfinished().values())
        return self.abort(dict.fromkeys(seq.request_id for seq in convicted), _ERROR)

    # -- internals -----------------------------------------------------------

    def _on_preempt(self, seq: Sequence, cause: str, mode: str) -> None:
        """Called by the policy before the victim's blocks are freed or swapped."""
        self._counters["preemptions"] += 1
        self._counters[f"preemptions_{mode}"] += 1
        log_preempted(seq, cause, mode, self.block_manager)
        self._planner.release(seq)

    # -- introspection -------------------------------------------------------

    def get_sequence(self, seq_id: int) -> Sequence | None:
        """An unfinished sequence by id (for tests and debugging)."""
        return self._requests.sequence(seq_id)

    def get_request(self, request_id: str) -> Request | None:
        """A request in flight by id (for tests and debugging)."""
        return self._requests.get(request_id)

    def stats(self) -> dict[str, int]:
        """Gauges (sequences running/waiting/swapped, device and host KV blocks)
        and the `_COUNTERS` totals; units in the names (blocks, tokens)."""
        bm, policy = self.block_manager, self.policy
        totals = {**self._requests.counters, **self._counters, **self._planner.counters}
        return {
            "running": len(policy.running),
            "waiting": len(policy.waiting),
            "swapped": len(policy.swapped),
            "requests_in_flight": len(self._requests) + self.awaiting_grammar(),
            **{name: totals[name] for name in _COUNTERS},
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_used_peak": self._kv_blocks_used_peak,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_cached": bm.num_cached_blocks,
            "kv_blocks_allocated": bm.blocks_allocated,
            "kv_blocks_evicted": bm.blocks_evicted,
            "host_blocks_used": bm.num_used_host_blocks,
            "host_blocks_total": bm.num_host_blocks,
            **policy.step_budget.figures(),
            **self.structured.stats(),
            **self._beams.stats(),
            **self._spec.stats(),
        }

    def check_invariants(self) -> None:
        """O(everything): for tests (scheduler/invariants.py says what is checked)."""
        check_scheduler_invariants(self, self._requests.unfinished(), self.in_flight)

