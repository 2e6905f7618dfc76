"""Scheduler parts of sampling: min_tokens holds EOS/stop ids back, one of n outputs stopped
alone (a stop string) frees its blocks at once, and logprobs ride on the deltas."""

from __future__ import annotations

from sched_harness import EOS, Harness, add, make_scheduler

from shared.protocol import StepResult, TokenLogprobs


def _always(token: int):
    return lambda history, output_index, seed: token


def test_eos_does_not_finish_before_min_tokens():
    h = Harness(make_scheduler(), sample=_always(EOS))
    h.add(add("m", [5, 6, 7], max_tokens=10, min_tokens=3))
    h.add(add("plain", [5, 6, 8], max_tokens=10))
    h.run()
    assert h.outputs[("plain", 0)] == [EOS] and h.finished[("plain", 0)].finish_reason == "stop"
    # Tokens 0..2 are under min_tokens (the worker masks EOS there; this fake worker does not).
    assert h.outputs[("m", 0)] == [EOS] * 4 and h.finished[("m", 0)].finish_reason == "stop"


def test_finish_outputs_finishes_one_output_and_frees_its_blocks():
    h = Harness(make_scheduler(enable_prefix_caching=False), sample=_always(9))
    h.add(add("n", [1, 2, 3, 4, 5, 6], n=2, max_tokens=40, seed=3))
    for _ in range(6):
        h.step()
    sched = h.scheduler
    used = sched.stats()["kv_blocks_used"]
    outputs = sched.finish_outputs([("n", 1), ("n", 7), ("unknown", 0)])
    assert [(d.request_id, d.index, d.finish_reason) for _, d in outputs] == [("n", 1, "stop")]
    assert sched.stats()["kv_blocks_used"] < used
    assert sched.finish_outputs([("n", 1)]) == []  # already finished: ignored
    sched.check_invariants()
    h.record(outputs)
    h.run()
    assert h.finished[("n", 0)].finish_reason == "length" and len(h.outputs[("n", 0)]) == 40
    stats = sched.stats()
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0


def test_logprobs_of_the_result_ride_on_the_deltas():
    sched = make_scheduler()
    sched.add_request(add("a", [1, 2, 3], max_tokens=5, logprobs=1, prompt_logprobs=1), b"fe")
    plan = sched.schedule()
    chosen = TokenLogprobs(7, -0.5, 1, [7], [-0.5])
    prompt = [TokenLogprobs(2, -1.0, 2), TokenLogprobs(3, -2.0, 3)]
    outputs = sched.update(StepResult(plan.step_id, [7], logprobs=[chosen], prompt_logprobs=[prompt]))
    (_, delta), = outputs
    assert delta.token_ids == [7] and delta.logprobs == [chosen] and delta.prompt_logprobs == prompt
