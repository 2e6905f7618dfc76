"""A request that kills the worker (scheduler/isolation.py): after a worker failure with a
step in flight, that step's sequences run alone until each samples a token; one in flight
at CRASH_LIMIT failures in a row fails with "error", and every other request finishes with
the tokens of a fault-free run. The fake worker (no sockets, no torch) stands in."""

from __future__ import annotations

import pytest
from sched_harness import Harness, add, make_scheduler, reference_output

from scheduler.isolation import CRASH_LIMIT

MAX_MODEL_LEN = 256


def _requests(count: int):
    return [add(f"r{i}", [1 + (7 * i + j) % 60 for j in range(3 + (5 * i) % 17)], arrival=float(i),
                max_tokens=6 + i % 9, seed=i, n=2 if i % 4 == 1 else 1, ignore_eos=True)
            for i in range(count)]


def _new_worker(h: Harness) -> None:
    h.worker = type(h.worker)(h.scheduler.block_manager.block_size)


def _run(h: Harness, crash) -> list[list[str]]:
    """Step to the end; `crash(plan, request_ids, step)` says whether the worker dies running
    `plan` (it never answers; the scheduler is told with the plan in flight). Returns the
    request ids of each crashed plan."""
    sched, crashed, steps = h.scheduler, [], 0
    while sched.has_work():
        plan = sched.schedule()
        assert plan.scheduled
        ids = [sched.get_sequence(work.seq_id).request_id for work in plan.scheduled]
        if crash(plan, ids, steps):
            crashed.append(ids)
            h.record(sched.on_worker_restart(blame_in_flight=True))
            _new_worker(h)
        else:
            h.worker.apply(plan)
            h.record(sched.update(h.worker.run(plan)))
        sched.check_invariants()
        steps += 1
        assert steps < 5000
    assert sched.block_manager.num_used_blocks == 0
    return crashed


def _check_outputs(h: Harness, msgs, failed: set[str]) -> None:
    for msg in msgs:
        for index in range(msg.params.n):
            done = h.finished[(msg.request_id, index)]
            if msg.request_id in failed:
                assert done.finish_reason == "error"
                continue
            tokens, reason = reference_output(msg.prompt_token_ids, msg.params, index, max_model_len=MAX_MODEL_LEN)
            assert h.outputs[(msg.request_id, index)] == tokens and done.finish_reason == reason


@pytest.mark.parametrize("poison", ["r0", "r5", "r9"])  # r5 has n=2: its outputs fork after a solo prefill
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_request_that_kills_every_worker_fails_alone(poison, mode):
    h = Harness(make_scheduler(num_blocks=40, block_size=4, max_num_seqs=6, max_num_batched_tokens=32,
                               max_model_len=MAX_MODEL_LEN, num_host_blocks=16, preemption_mode=mode))
    msgs = _requests(12)
    for msg in msgs:
        h.add(msg)
    crashed = _run(h, lambda plan, ids, step: poison in ids)
    assert len(crashed) == CRASH_LIMIT
    for ids in crashed[1:]:  # after the first failure the suspect ran alone: one sequence per step
        assert ids == [poison]
    _check_outputs(h, msgs, failed={poison})
    assert h.scheduler.stats()["requests_failed"] == 1


def test_one_failure_isolates_the_step_then_batching_resumes_and_nobody_fails():
    h = Harness(make_scheduler(num_blocks=200, block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                               max_model_len=MAX_MODEL_LEN))
    msgs = _requests(10)
    for msg in msgs:
        h.add(msg)
    suspects: list[str] = []
    sizes: list[int] = []

    def crash(plan, ids, step):
        sizes.append(len(ids))
        if step == 4:
            suspects.extend(ids)
            return True
        return False

    assert len(_run(h, crash)) == 1
    assert len(suspects) > 1
    # Every suspect ran alone (several steps for a prefill in chunks), then batches again.
    alone = sizes[5:5 + len(suspects)]
    assert alone == [1] * len(alone)
    assert max(sizes[5 + len(suspects):]) > 1
    _check_outputs(h, msgs, failed=set())


def test_failures_with_tokens_in_between_convict_nobody():
    """An operator's kill -9 now and then: a suspect that sampled a token since is cleared."""
    h = Harness(make_scheduler(num_blocks=200, block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                               max_model_len=MAX_MODEL_LEN))
    msgs = _requests(10)
    for msg in msgs:
        h.add(msg)
    tokens_at_crash = [-1]

    def crash(plan, ids, step):
        streamed = sum(len(t) for t in h.outputs.values())
        if streamed >= tokens_at_crash[0] + 25 and len(ids) > 1:  # a batch, after progress since the last
            tokens_at_crash[0] = streamed
            return True
        return False

    assert len(_run(h, crash)) >= CRASH_LIMIT
    _check_outputs(h, msgs, failed=set())
    assert h.scheduler.stats()["requests_failed"] == 0
