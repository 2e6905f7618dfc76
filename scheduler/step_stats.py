"""Throughput and step-time figures the scheduler loop adds to `Scheduler.stats()`.

Counted from the plans and results the worker link moves (scheduler/worker_link.py),
so the `Scheduler` need not know about time:

* prompt tokens: tokens a step computes out of what a sequence already had when
  it was (re)sent to the worker, i.e. prefill, and recompute after a preemption.
  Prefix-cache hits are not computed, so they are not counted here.
* generation tokens: the scheduler's own `tokens_generated` counter.
* rates are tokens per second over the last stats interval (`sample`).
* step times are the workers' own timings (`StepResult.step_time_s`) of the
  last `window` steps.
* decode phases: for steps where every sequence decodes one token, cumulative
  seconds per phase, keyed by the step's batch size (sequences), so a benchmark
  can difference two readings at the batch size it drove. Phases: `schedule`
  (the scheduler building and sending the plan), `ipc` (the round trip minus the
  worker's own step time: sockets, encoding, decoding), the worker's `prepare`
  (plan changes, input tensors), `forward` (the model's layers) and `sample` (LM
  head, sampling, bookkeeping; on CUDA also where the host waits for the device), and `update` (the scheduler
  applying the result and sending token deltas). `step` is the whole iteration.
"""

from __future__ import annotations

import collections

from shared.protocol import StepPlan, StepResult


class StepStats:
    def __init__(self, window: int = 1000):
        self.step_times: collections.deque[float] = collections.deque(maxlen=window)
        self.prompt_tokens = 0  # computed prefill tokens since start
        self._known_len: dict[int, int] = {}  # seq id -> tokens it had when last sent as a NewSeq
        self._last: tuple[float, int, int] | None = None  # (monotonic s, prompt_tokens, tokens_generated)
        self.rates: dict[str, float] = {"prompt_tokens_per_s": 0.0, "generation_tokens_per_s": 0.0}
        self.decode_phases: dict[int, dict[str, float]] = {}  # batch size -> phase -> seconds (+ "steps")
        self._plan_times = (0.0, 0.0)  # perf_counter seconds: the plan in flight's schedule start, and its send

    def on_plan(self, plan: StepPlan, *, started: float, sent: float) -> None:
        """Call once per plan sent: `started` when scheduling began, `sent` when the plan left
        (perf_counter seconds). Order as the worker applies it: drops, then new seqs."""
        self._plan_times = (started, sent)
        for seq_id in plan.finished_seq_ids:
            self._known_len.pop(seq_id, None)
        for seq in plan.new_seqs:
            self._known_len[seq.seq_id] = len(seq.token_ids)
        for work in plan.scheduled:
            known = self._known_len.get(work.seq_id, 0)
            end = min(work.num_computed_tokens + work.num_tokens, known)
            self.prompt_tokens += max(0, end - work.num_computed_tokens)

    def on_result(self, plan: StepPlan, result: StepResult, *, received: float, applied: float) -> None:
        """Call once per result applied: `received` when it arrived, `applied` when its deltas were
        sent (perf_counter seconds); `plan` is the plan it answers, the last one `on_plan` saw."""
        self.step_times.append(result.step_time_s)
        started, sent = self._plan_times
        self._account_phases(plan, result, schedule_s=sent - started, round_trip_s=received - sent,
                             update_s=applied - received)

    def _account_phases(self, plan: StepPlan, result: StepResult, schedule_s: float, round_trip_s: float,
                        update_s: float) -> None:
        """Account one finished step's phases (seconds) if it was decode-only."""
        if not plan.scheduled or any(work.num_tokens != 1 for work in plan.scheduled) or plan.new_seqs:
            return
        worker = result.phase_times_s
        phases = {"schedule": schedule_s, "ipc": max(0.0, round_trip_s - result.step_time_s),
                  "prepare": worker.get("prepare", 0.0), "forward": worker.get("forward", 0.0),
                  "sample": worker.get("sample", 0.0), "update": update_s,
                  "step": schedule_s + round_trip_s + update_s}
        totals = self.decode_phases.setdefault(len(plan.scheduled), dict.fromkeys(("steps", *phases), 0.0))
        totals["steps"] += 1
        for name, seconds in phases.items():
            totals[name] += seconds

    def phase_totals(self) -> dict[str, dict[str, float]]:
        """`decode_phases` with string keys (batch size), for the stats reply."""
        return {str(batch): {name: round(value, 6) for name, value in totals.items()}
                for batch, totals in sorted(self.decode_phases.items())}

    def sample(self, now: float, tokens_generated: int) -> None:
        """Recompute `rates` over the time since the previous call (`now`: monotonic seconds)."""
        if self._last is not None and now > self._last[0]:
            then, prompt, generated = self._last
            self.rates = {"prompt_tokens_per_s": round((self.prompt_tokens - prompt) / (now - then), 3),
                          "generation_tokens_per_s": round((tokens_generated - generated) / (now - then), 3)}
        self._last = (now, self.prompt_tokens, tokens_generated)

    def figures(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"prompt_tokens": self.prompt_tokens, **self.rates}
        times = sorted(self.step_times) or [0.0]  # 0 before the first step
        out["step_time_p50_s"] = times[len(times) // 2]
        out["step_time_p99_s"] = times[min(len(times) - 1, int(len(times) * 0.99))]
        return out
