"""Scheduler: plans as diffs, continuous batching, finishing, abort, n > 1."""

from __future__ import annotations

import pytest
from sched_harness import EOS, Harness, add, make_scheduler, reference_output, toy_sample

from shared.protocol import SamplingParams, StepResult


def expect(h: Harness, msg, max_model_len=256, sample=toy_sample):
    for index in range(msg.params.n):
        tokens, reason = reference_output(msg.prompt_token_ids, msg.params, index, max_model_len=max_model_len,
                                          sample=sample)
        key = (msg.request_id, index)
        assert h.outputs[key] == tokens, key
        assert h.finished[key].finish_reason == reason, key


def test_prefill_is_sent_once_then_only_decode_diffs():
    h = Harness(make_scheduler(block_size=4))
    msg = add("a", [5, 6, 7, 8, 9], max_tokens=6, ignore_eos=True)
    h.add(msg)
    first = h.step()
    assert [n.token_ids for n in first.new_seqs] == [[5, 6, 7, 8, 9]]
    assert len(first.new_seqs[0].block_ids) == 2 and first.new_seqs[0].prompt_len == 5
    assert [(w.num_tokens, w.num_computed_tokens, w.new_block_ids) for w in first.scheduled] == [(5, 0, [])]
    for position in (5, 6, 7):  # positions 5..7 still fit block 1
        plan = h.step()
        assert plan.new_seqs == []
        assert [(w.num_tokens, w.num_computed_tokens) for w in plan.scheduled] == [(1, position)]
        assert plan.scheduled[0].new_block_ids == []
    plan = h.step()  # position 8 starts block 2
    assert len(plan.scheduled[0].new_block_ids) == 1
    h.run()
    expect(h, msg)
    assert h.plans[-1].finished_seq_ids == []  # the drop rides with the next plan
    assert h.scheduler.stats()["kv_blocks_used"] == 0


def test_a_request_added_while_others_run_joins_at_the_next_step():
    h = Harness(make_scheduler())
    a = add("a", [1, 2, 3], max_tokens=20, ignore_eos=True)
    b = add("b", [4, 5], max_tokens=5, ignore_eos=True)
    h.add(a)
    h.step()
    h.step()
    h.add(b)
    plan = h.step()
    assert {n.seq_id for n in plan.new_seqs} == {h.scheduler.get_request("b").seqs[0].seq_id}
    assert len(plan.scheduled) == 2  # a's decode and b's prefill in one batch
    h.run()
    expect(h, a)
    expect(h, b)


def test_finished_sequence_is_dropped_in_the_next_plan_and_freed_at_once():
    h = Harness(make_scheduler())
    h.add(add("a", [1, 2], max_tokens=1))
    h.add(add("b", [3, 4], max_tokens=10, ignore_eos=True))
    h.step()
    assert ("a", 0) in h.finished and h.scheduler.stats()["kv_blocks_used"] == 1  # b's block only
    plan = h.step()
    assert plan.finished_seq_ids == [0]


def test_eos_stops_unless_ignore_eos():
    def eos_at_3(history, index, seed):  # EOS as the 3rd generated token of a 2-token prompt
        return EOS if len(history) == 4 else 7

    h = Harness(make_scheduler(), sample=eos_at_3)
    h.add(add("stop", [1, 2], max_tokens=10))
    h.add(add("ignore", [1, 2], max_tokens=5, ignore_eos=True))
    h.run()
    assert h.outputs[("stop", 0)] == [7, 7, EOS] and h.finished[("stop", 0)].finish_reason == "stop"
    assert h.outputs[("ignore", 0)] == [7, 7, EOS, 7, 7] and h.finished[("ignore", 0)].finish_reason == "length"


def test_stop_token_ids_stop_and_are_included():
    h = Harness(make_scheduler(), sample=lambda history, index, seed: len(history))
    h.add(add("s", [9, 9, 9], max_tokens=10, stop_token_ids=[5]))
    h.run()
    assert h.outputs[("s", 0)] == [3, 4, 5] and h.finished[("s", 0)].finish_reason == "stop"


def test_max_tokens_and_max_model_len_give_length():
    h = Harness(make_scheduler(max_model_len=12), sample=lambda history, index, seed: 1)
    h.add(add("m", [2, 2], max_tokens=3))
    h.add(add("full", [2, 2, 2, 2, 2], max_tokens=None))  # up to max_model_len: 7 tokens
    h.run()
    assert h.outputs[("m", 0)] == [1, 1, 1] and h.finished[("m", 0)].finish_reason == "length"
    assert h.outputs[("full", 0)] == [1] * 7 and h.finished[("full", 0)].finish_reason == "length"


def test_n_outputs_share_one_prompt_prefill_then_diverge():
    h = Harness(make_scheduler(num_blocks=30, block_size=2))
    msg = add("n", [3, 1, 4, 1, 5], n=3, max_tokens=12, seed=11)
    h.add(msg)
    first = h.step()  # output 0 alone prefills the prompt but its last token
    assert [(n.output_index, len(n.token_ids)) for n in first.new_seqs] == [(0, 5)]
    assert [(w.num_tokens, w.num_computed_tokens) for w in first.scheduled] == [(4, 0)]
    second = h.step()  # the forks join, sharing both full blocks; each computes token 4 itself
    assert sorted(n.output_index for n in second.new_seqs) == [1, 2]
    assert all(n.block_ids[:2] == first.new_seqs[0].block_ids for n in second.new_seqs)
    assert [(w.num_tokens, w.num_computed_tokens) for w in second.scheduled] == [(1, 4)] * 3
    assert second.copy == []  # 4 tokens fill 2 blocks exactly: nothing partial to copy
    h.run()
    expect(h, msg)
    assert len({tuple(h.outputs[("n", i)]) for i in range(3)}) == 3


def test_forks_copy_a_shared_partial_block_before_writing_it():
    h = Harness(make_scheduler(num_blocks=30, block_size=4))
    msg = add("n", [3, 1, 4, 1, 5, 9, 2], n=3, max_tokens=6, seed=5, ignore_eos=True)
    h.add(msg)
    h.step()  # 6 tokens: one full block and a partial one, then the fork
    plan = h.step()
    # The parent (on the worker) and the first fork copy the shared partial block; the last holder writes in place.
    assert len(plan.copy) == 2 and len({src for src, _ in plan.copy}) == 1
    assert {n.seq_id for n in plan.new_seqs} == {0, 1, 2}  # the parent is re-sent whole with its new last block
    h.run()
    expect(h, msg)
    assert h.scheduler.stats()["blocks_copied"] == 2


def test_n_outputs_use_fewer_blocks_than_separate_requests():
    def allocated(msgs):
        h = Harness(make_scheduler(block_size=4, enable_prefix_caching=False))
        for m in msgs:
            h.add(m)
        h.run()
        return h.scheduler.stats()["kv_blocks_allocated"]

    prompt = list(range(1, 31))
    shared = allocated([add("n", prompt, n=4, max_tokens=6, seed=1, ignore_eos=True)])
    separate = allocated([add(f"s{i}", prompt, max_tokens=6, seed=1, ignore_eos=True) for i in range(4)])
    # 35 tokens get KV (the last sampled one never does): 9 blocks each, apart. Together: the parent's
    # 8 blocks for 29 prompt tokens, 3 copies of the shared partial block, and each output's 9th block.
    assert separate == 4 * 9 and shared == 8 + 3 + 4


def test_abort_frees_blocks_at_once_and_drops_what_the_worker_holds():
    h = Harness(make_scheduler(max_num_seqs=1))
    h.add(add("run", [1, 2, 3, 4, 5], max_tokens=50, ignore_eos=True))
    h.add(add("wait", [6, 7], max_tokens=50, ignore_eos=True))
    h.step()
    h.step()
    sched = h.scheduler
    used = sched.stats()["kv_blocks_used"]
    assert used > 0
    outputs = sched.abort(["run", "wait", "unknown"])
    assert [(fe, d.request_id, d.token_ids, d.finish_reason) for fe, d in outputs] == [
        (b"fe", "run", [], "abort"), (b"fe", "wait", [], "abort")]
    stats = sched.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert stats["requests_aborted"] == 2 and not sched.has_work()
    sched.check_invariants()
    h.add(add("next", [1], max_tokens=2))
    plan = h.step()
    assert plan.finished_seq_ids == [0]  # "run" was on the worker; "wait" never was


def test_abort_while_a_step_is_in_flight_discards_its_token():
    h = Harness(make_scheduler())
    h.add(add("a", [1, 2], max_tokens=10, ignore_eos=True))
    h.add(add("b", [3, 4], max_tokens=10, ignore_eos=True))
    h.step()
    sched = h.scheduler
    plan = sched.schedule()
    h.worker.apply(plan)
    result = h.worker.run(plan)
    sched.abort(["a"])
    outputs = sched.update(result)
    assert [d.request_id for _, d in outputs] == ["b"]
    sched.check_invariants()
    assert h.step().finished_seq_ids == [0]


def test_abort_frontend_aborts_only_its_requests():
    sched = make_scheduler()
    sched.add_request(add("x", [1], max_tokens=4), b"one")
    sched.add_request(add("y", [1], max_tokens=4), b"two")
    assert sched.abort_frontend(b"one") == ["x"]
    assert sched.stats()["requests_in_flight"] == 1


def test_fail_step_finishes_the_planned_requests_with_error():
    h = Harness(make_scheduler(max_num_seqs=1))
    h.add(add("a", [1, 2], max_tokens=10, ignore_eos=True))
    h.add(add("b", [3, 4], max_tokens=10, ignore_eos=True))
    plan = h.scheduler.schedule()
    outputs = h.scheduler.fail_step(plan.step_id)
    assert [(d.request_id, d.finish_reason) for _, d in outputs] == [("a", "error")]
    assert h.scheduler.stats()["requests_failed"] == 1
    h.worker = type(h.worker)(4)  # the failed worker's state is gone with it
    h.scheduler.on_worker_restart()
    h.run()
    assert h.finished[("b", 0)].finish_reason == "length"


def test_worker_restart_resends_everything_and_outputs_do_not_change():
    h = Harness(make_scheduler(block_size=2))
    msgs = [add(f"r{i}", [i + 1, i + 2, i + 3], max_tokens=15, seed=i, ignore_eos=True) for i in range(4)]
    for msg in msgs:
        h.add(msg)
    for _ in range(5):
        h.step()
    h.scheduler.schedule()  # in flight when the worker dies
    h.scheduler.on_worker_restart()
    h.worker = type(h.worker)(2)
    plan = h.step()
    assert plan.finished_seq_ids == [] and len(plan.new_seqs) == 4
    assert all(len(n.token_ids) > n.prompt_len for n in plan.new_seqs)  # generated tokens kept
    h.run()
    for msg in msgs:
        expect(h, msg)
    assert all(h.finished[(m.request_id, 0)].num_preemptions == 1 for m in msgs)


def test_step_protocol_misuse_is_an_error():
    sched = make_scheduler()
    sched.add_request(add("a", [1, 2], max_tokens=3), b"fe")
    plan = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(ValueError):
        sched.update(StepResult(plan.step_id + 1, [1]))
    with pytest.raises(ValueError):
        sched.update(StepResult(plan.step_id, [1, 2]))
    sched.update(StepResult(plan.step_id, [1]))


def test_no_work_gives_an_empty_plan_that_is_not_a_step():
    sched = make_scheduler()
    assert not sched.has_work()
    plan = sched.schedule()
    assert plan.scheduled == [] and plan.finished_seq_ids == []
    sched.add_request(add("a", [1, 2], max_tokens=3), b"fe")
    assert sched.schedule().step_id == plan.step_id  # no update was owed


def test_stats_count_steps_tokens_and_finished_requests():
    h = Harness(make_scheduler())
    h.add(add("a", [1, 2], max_tokens=4, ignore_eos=True, n=2))
    h.run()
    stats = h.scheduler.stats()
    # n=2 with a 2-token prompt: one step prefills token 0, then both outputs take 4 steps.
    assert stats["steps"] == 5 and stats["tokens_generated"] == 8 and stats["requests_finished"] == 1
    assert stats["kv_blocks_total"] == 1000 and stats["kv_blocks_used"] == 0
    assert stats["running"] == stats["waiting"] == stats["preemptions"] == 0


def test_greedy_params_pass_through_to_the_worker():
    h = Harness(make_scheduler())
    params = SamplingParams(max_tokens=2, temperature=0.0, top_k=5, seed=3)
    h.scheduler.add_request(add("g", [1], max_tokens=2, temperature=0.0, top_k=5, seed=3), b"fe")
    assert h.step().new_seqs[0].params == params
