"""The step's token budget, from `--target-tpot-ms` and the step-time model; what each step cost.

Without a target the budget is `max_num_batched_tokens` (tokens), as before. With one, while
any sequence decodes, it is the most tokens the step-time model (scheduler/step_time_model.py)
says a step may compute within `target_ms`, capped by `max_num_batched_tokens` (the most the
worker was sized for). Decodes are served first whatever the budget (scheduler/policy_running.py).

Two budgets (`tokens_for`, `joinable`): sequences already running (their prefill chunks) may use
at least `min_prefill_tokens` (tokens) beside the decodes even when the model says the decodes
alone fill the target, so an admitted prompt always progresses and never waits for the decodes
to end (which would pile prompts up into one huge step). Sequences joining the step (swapped in,
admitted: new and recomputing alike) get only what the target leaves: each of them will decode in
every later step, so admitting past the target would push the running past it for good; under
overload they wait, and TTFT grows, not TPOT. While the model is not sure of the fixed cost
(`Fit.proportional`: steps seen were all about one size) the joinable budget is the whole one, so
the model sees steps of other sizes and learns. A step with nothing decoding has no one to keep
waiting: it gets `max_num_batched_tokens`. Before the first step is measured the model knows
nothing, and the budget is `max_num_batched_tokens` too.

Seats (`seats`): with a target and a full fit, at most as many sequences run as the target has
tokens for, decoding alone (on top of `max_num_seqs`): else a burst admitted in one step with
nothing decoding would decode past the target for its whole life.

Each step planned is `record`ed (its decode and prefill tokens, its budget, the model's
prediction) and then `observe`d with its time, which feeds the model and, with a target,
classifies a step that ran over it. That time is the step's cycle as its sequences see it between
two tokens (planning, the round trip to the worker and its forward, applying the step before:
scheduler/worker_link.py measures it), so the target bounds the TPOT a client sees, not just the
worker's share of it; without a loop (tests, benches in process) it is the worker's own time:

* `no_decodes`: nothing was decoding, so the whole budget went to prefill (allowed);
* `cold_start`: the model had not seen a step yet;
* `decodes`: the model said the decodes (with at most the `min_prefill_tokens` floor of prefill)
  would not fit the target, or the step had no prefill at all;
* `misprediction`: the model said the step would fit, and it did not (noise, a shared CPU,
  attention over long contexts, which the model does not see).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.step_time_model import StepTimeModel
from shared.logging import get_logger

log = get_logger("scheduler")

OVER_TARGET_REASONS = ("no_decodes", "cold_start", "decodes", "misprediction")
BUDGET_COUNTERS = ("step_decode_tokens", "step_prefill_tokens", "step_proposed_tokens", "steps_over_target",
                   *(f"steps_over_target_{reason}" for reason in OVER_TARGET_REASONS))


@dataclass(slots=True)
class PlannedStep:
    decode_tokens: int  # sequences computing their one next token
    prefill_tokens: int  # prompt (or recompute) chunk tokens
    budget: int  # tokens the step was allowed
    predicted_ms: float | None  # the model's time for decode + prefill tokens when planned
    proposed_tokens: int = 0  # speculative proposals verified in the step (within the budget)


class StepBudget:
    """Owns the step-time model, the step planned and not yet observed, and the counters."""

    def __init__(self, max_num_batched_tokens: int, target_ms: float | None = None,
                 model: StepTimeModel | None = None, min_prefill_tokens: int = 16) -> None:
        self.max_tokens = max_num_batched_tokens
        self.target_ms = target_ms
        self.min_prefill_tokens = min_prefill_tokens
        self.model = model or StepTimeModel()
        self.counters = dict.fromkeys(BUDGET_COUNTERS, 0)
        self.last_budget = max_num_batched_tokens  # tokens
        self._planned: PlannedStep | None = None

    def tokens_for(self, decodes: int) -> int:
        """The step's budget for running sequences (tokens, decodes included) when `decodes`
        sequences decode in it: the target's, but at least `min_prefill_tokens` beside them."""
        return min(self.max_tokens, max(self.joinable(decodes), decodes + self.min_prefill_tokens))

    def joinable(self, decodes: int) -> int:
        """Of `tokens_for`, what joining sequences may use too (tokens, decodes included): what the
        model says fits the target (possibly below `decodes`), or everything while it is unsure."""
        fit = self.model.fit() if self.target_ms is not None and decodes else None
        if fit is None:
            return self.max_tokens
        within = min(self.max_tokens, fit.tokens_within(self.target_ms))
        return max(within, decodes + self.min_prefill_tokens) if fit.proportional else within

    def seats(self) -> int | None:
        """Sequences that may run at most under the target (None: no bound from it)."""
        fit = self.model.fit() if self.target_ms is not None else None
        if fit is None or fit.proportional:
            return None
        return max(1, fit.tokens_within(self.target_ms))

    def record(self, decode_tokens: int, prefill_tokens: int, budget: int) -> None:
        """The step just planned (none is in flight: the one before was observed or failed)."""
        if decode_tokens + prefill_tokens == 0:
            return  # not a step: nothing will be sent or observed
        self.last_budget = budget
        self._planned = PlannedStep(decode_tokens, prefill_tokens, budget,
                                    self.model.predict_ms(decode_tokens + prefill_tokens))

    def add_proposed(self, tokens: int) -> None:
        """Speculation added `tokens` verification positions to the step just recorded: the
        step-time model learns the step's time against all the tokens it computed."""
        if self._planned is not None and tokens:
            self._planned.proposed_tokens += tokens
            self._planned.predicted_ms = self.model.predict_ms(
                self._planned.decode_tokens + self._planned.prefill_tokens + self._planned.proposed_tokens)

    def observe(self, step_time_s: float, step_id: int = -1) -> str | None:
        """The recorded step took `step_time_s` (its cycle, or the worker's time): learn from it;
        returns why it ran over the target (None when it did not, or without a target)."""
        step, self._planned = self._planned, None
        if step is None:
            return None
        c = self.counters
        c["step_decode_tokens"] += step.decode_tokens
        c["step_prefill_tokens"] += step.prefill_tokens
        ms = step_time_s * 1000.0
        c["step_proposed_tokens"] += step.proposed_tokens
        self.model.observe(step.decode_tokens + step.prefill_tokens + step.proposed_tokens, ms)
        if self.target_ms is None or ms <= self.target_ms:
            return None
        if step.decode_tokens == 0:
            reason = "no_decodes"
        elif step.predicted_ms is None:
            reason = "cold_start"
        elif step.prefill_tokens == 0 or step.predicted_ms > self.target_ms:
            reason = "decodes"
        else:
            reason = "misprediction"
        c["steps_over_target"] += 1
        c[f"steps_over_target_{reason}"] += 1
        log.debug("scheduler.step_over_target", step_id=step_id, step_ms=round(ms, 3), target_ms=self.target_ms,
                  reason=reason, decode_tokens=step.decode_tokens, prefill_tokens=step.prefill_tokens,
                  budget_tokens=step.budget,
                  predicted_ms=None if step.predicted_ms is None else round(step.predicted_ms, 3))
        return reason

    def figures(self) -> dict[str, float | int]:
        """Counters (totals since start) and gauges: the last step's budget (tokens), the model
        (ms, ms per token) and the target (ms) when there is one."""
        out: dict[str, float | int] = {**self.counters, "step_token_budget": self.last_budget}
        fit = self.model.fit()
        if fit is not None:
            out["step_model_fixed_ms"] = round(fit.fixed_ms, 3)
            out["step_model_ms_per_token"] = round(fit.ms_per_token, 4)
        if self.target_ms is not None:
            out["target_tpot_ms"] = self.target_ms
        return out
