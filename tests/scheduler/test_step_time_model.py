"""The step-time model (tokens -> ms) and the step budget it gives: pure functions of the steps fed."""

from __future__ import annotations

import pytest

from scheduler.step_budget import StepBudget
from scheduler.step_time_model import StepTimeModel
from shared.config import ServerConfig


def test_a_linear_machine_is_learned_exactly():
    model = StepTimeModel()
    for tokens in (1, 32, 300, 40, 512, 8, 100):
        model.observe(tokens, 20.0 + 0.25 * tokens)
    fit = model.fit()
    assert not fit.proportional
    assert fit.fixed_ms == pytest.approx(20.0) and fit.ms_per_token == pytest.approx(0.25)
    assert model.predict_ms(200) == pytest.approx(70.0)
    assert model.fit().tokens_within(70.0) in (199, 200)  # float rounding at the boundary
    assert model.fit().tokens_within(20.0) == 0 and model.fit().tokens_within(5.0) == 0


def test_nothing_known_before_the_first_step_and_bad_samples_are_ignored():
    model = StepTimeModel()
    assert model.fit() is None and model.predict_ms(10) is None
    model.observe(0, 50.0)
    model.observe(10, float("nan"))
    model.observe(10, -1.0)
    model.observe(10, float("inf"))
    assert model.fit() is None and model.steps == 0


def test_steps_of_one_size_give_the_proportional_model_which_errs_on_the_slow_side():
    model = StepTimeModel()
    for _ in range(20):
        model.observe(32, 64.0)  # 32 decodes: 40 ms fixed + 0.75 ms per token, say; one size cannot tell
    fit = model.fit()
    assert fit.proportional and fit.ms_per_token == pytest.approx(2.0)
    assert model.fit().tokens_within(100.0) == 50  # the true machine would allow 80: the budget errs small


def test_a_fit_that_does_not_grow_with_tokens_falls_back_to_proportional():
    model = StepTimeModel(min_spread_tokens=1.0)
    for tokens, ms in ((10, 50.0), (100, 40.0), (10, 52.0), (100, 38.0)):
        model.observe(tokens, ms)
    assert model.fit().proportional


def test_a_negative_fixed_cost_is_clamped_to_zero():
    model = StepTimeModel()
    for tokens in (100, 200, 300, 400):
        model.observe(tokens, -10.0 + 0.5 * tokens)
    fit = model.fit()
    assert fit.fixed_ms == 0.0 and fit.ms_per_token == pytest.approx(0.5)


def test_forgetting_follows_a_machine_that_slows_down():
    model = StepTimeModel(decay=0.8)
    for i in range(40):
        model.observe(10 + 50 * (i % 5), 10.0 + 0.1 * (10 + 50 * (i % 5)))
    for i in range(60):
        model.observe(10 + 50 * (i % 5), 20.0 + 0.2 * (10 + 50 * (i % 5)))
    fit = model.fit()
    assert fit.fixed_ms == pytest.approx(20.0, rel=1e-3) and fit.ms_per_token == pytest.approx(0.2, rel=1e-3)


def test_budget_without_a_target_is_max_num_batched_tokens():
    budget = StepBudget(2048)
    budget.model.observe(100, 1000.0)
    assert budget.tokens_for(32) == 2048 and budget.tokens_for(0) == 2048


def test_budget_with_a_target_comes_from_the_model_while_anything_decodes():
    budget = StepBudget(2048, target_ms=100.0)
    assert budget.tokens_for(32) == 2048  # cold: nothing measured yet
    for tokens in (32, 400, 64, 1000):
        budget.model.observe(tokens, 20.0 + 0.1 * tokens)
    assert budget.tokens_for(32) in (799, 800)
    assert budget.tokens_for(0) == 2048  # nothing decodes: no one to keep waiting
    budget.target_ms = 1000.0
    assert budget.tokens_for(32) == 2048  # never past what the worker was sized for


def test_an_unreachable_target_still_leaves_the_prefill_floor():
    budget = StepBudget(2048, target_ms=30.0)
    for tokens in (8, 200, 40, 500):
        budget.model.observe(tokens, 50.0 + 0.1 * tokens)  # the decodes alone take 50 ms
    assert budget.tokens_for(8) == 8 + 16  # running prefills keep a floor
    assert budget.joinable(8) == 0  # nothing joins: it would decode past the target from then on
    budget.target_ms = 60.0
    assert budget.joinable(8) in (99, 100) and budget.tokens_for(8) == budget.joinable(8)  # float rounding
    budget.model = StepTimeModel()
    budget.model.observe(1, 40.0)  # one size seen: proportional, 40 ms a token
    assert budget.tokens_for(1) == budget.joinable(1) == 1 + 16  # a probe beside the decode, so the model learns


def _observe(budget: StepBudget, decodes: int, prefill: int, ms: float) -> str | None:
    budget.record(decodes, prefill, budget.tokens_for(decodes))
    return budget.observe(ms / 1000)


def test_steps_over_the_target_are_counted_with_their_reason():
    budget = StepBudget(4096, target_ms=50.0)
    assert _observe(budget, 0, 1000, 400.0) == "no_decodes"
    budget.model = StepTimeModel()
    assert _observe(budget, 8, 100, 80.0) == "cold_start"  # recorded before any step was measured
    for tokens in (10, 200, 50, 300):
        budget.model.observe(tokens, 10.0 + 0.1 * tokens)
    assert _observe(budget, 8, 300, 40.0) is None
    assert _observe(budget, 8, 300, 60.0) == "misprediction"
    assert _observe(budget, 600, 0, 70.0) == "decodes"
    figures = budget.figures()
    assert figures["steps_over_target"] == 4
    assert [figures[f"steps_over_target_{r}"] for r in ("no_decodes", "cold_start", "misprediction", "decodes")] \
        == [1, 1, 1, 1]
    assert figures["step_decode_tokens"] == 8 * 3 + 600 and figures["step_prefill_tokens"] == 1000 + 100 + 300 * 2
    assert figures["target_tpot_ms"] == 50.0 and figures["step_model_ms_per_token"] > 0


def test_an_unrecorded_step_is_not_observed():
    budget = StepBudget(512, target_ms=10.0)
    budget.record(0, 0, 512)  # an empty batch is not a step
    assert budget.observe(1.0) is None and budget.model.steps == 0


@pytest.mark.parametrize("settings, error", [
    ({"target_tpot_ms": 0.0}, "target_tpot_ms"),
    ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
    ({"batching_policy": "fcfs", "target_tpot_ms": 100.0}, "decode_first"),
    ({"batching_policy": "sjf"}, "batching_policy"),
])
def test_bad_settings_are_refused(settings, error):
    with pytest.raises(ValueError, match=error):
        ServerConfig.from_settings(**settings).validate()


def test_the_chunk_cap_resolves_from_max_model_len():
    scheduler = ServerConfig().scheduler
    assert scheduler.resolved_long_prefill_token_threshold(8192) == 327
    assert scheduler.resolved_long_prefill_token_threshold(2048) == 256
    assert ServerConfig.from_settings(long_prefill_token_threshold=0).scheduler \
        .resolved_long_prefill_token_threshold(8192) == 0


def test_speculative_proposals_count_as_tokens_of_the_step():
    observed = []

    class Recording(StepTimeModel):
        def observe(self, tokens: int, ms: float) -> None:
            observed.append(tokens)
            super().observe(tokens, ms)

    budget = StepBudget(512, model=Recording())
    budget.record(2, 0, 512)
    budget.add_proposed(6)  # two decodes verifying 3 proposals each: 8 positions computed
    budget.observe(0.010)
    assert observed == [8]
    assert budget.figures()["step_proposed_tokens"] == 6


def test_the_scheduler_learns_the_cycle_its_loop_measured_over_the_workers_time():
    # The loop passes the cycle between two tokens (planning + round trip + applying); the worker's
    # own step_time_s is only the fallback, so the target bounds the TPOT a client sees.
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from sched_harness import FakeWorker, add, make_scheduler

    sched, worker = make_scheduler(), FakeWorker(4)
    observed = []
    model = sched.policy.step_budget.model
    model.observe = lambda tokens, ms: observed.append((tokens, ms))
    sched.add_request(add("r", [1, 2, 3], max_tokens=3, ignore_eos=True), b"fe")
    for cycle_s in (0.020, 0.021, None):
        plan = sched.schedule()
        worker.apply(plan)
        result = worker.run(plan)
        result.step_time_s = 0.005
        sched.update(result, cycle_s=cycle_s)
    assert observed == [(3, 20.0), (1, 21.0), (1, 5.0)]
