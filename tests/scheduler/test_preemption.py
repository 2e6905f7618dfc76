"""Priority order, preemption by recompute, and progress under tiny caches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sched_harness import Harness, add, make_scheduler, reference_output
from structlog.testing import capture_logs


def run_all(sched, msgs, arrivals=None):
    h = Harness(sched)
    h.run(arrivals or {0: msgs})
    return h


def outputs_of(h, msgs):
    return {(m.request_id, i): (h.outputs[(m.request_id, i)], h.finished[(m.request_id, i)].finish_reason)
            for m in msgs for i in range(m.params.n)}


def expected(msgs, max_model_len):
    return {(m.request_id, i): reference_output(m.prompt_token_ids, m.params, i, max_model_len=max_model_len)
            for m in msgs for i in range(m.params.n)}


def workload(count=8):
    return [add(f"r{i}", [(7 * i + j) % 60 + 1 for j in range(3 + i)], max_tokens=20, seed=i, n=1 + (i == 5))
            for i in range(count)]


def test_tiny_cache_preempts_and_outputs_match_a_huge_cache():
    msgs = workload()
    huge = run_all(make_scheduler(num_blocks=10_000, block_size=2), msgs)
    with capture_logs() as logs:
        tiny = run_all(make_scheduler(num_blocks=16, block_size=2), msgs)  # one 30-token sequence needs 15
    assert huge.scheduler.stats()["preemptions"] == 0
    preemptions = tiny.scheduler.stats()["preemptions"]
    assert preemptions > 0
    assert outputs_of(tiny, msgs) == outputs_of(huge, msgs) == expected(msgs, 256)
    assert sum(d.num_preemptions for d in tiny.finished.values()) == preemptions
    events = [e for e in logs if e["event"] == "request.preempted"]
    assert len(events) == preemptions
    assert all(e["mode"] == "recompute" and e["kv_blocks_total"] == 16 and e["tokens_to_recompute"] > 0
               and e["kv_blocks_used"] <= 16 for e in events)


def test_preempted_sequence_is_dropped_then_resent_whole():
    h = Harness(make_scheduler(num_blocks=16, block_size=2))
    for msg in workload():
        h.add(msg)
    while not any(p.finished_seq_ids for p in h.plans) or h.scheduler.stats()["preemptions"] == 0:
        h.step()
    victim = next(s for p in h.plans for s in p.finished_seq_ids)
    resend = None
    while resend is None:
        resend = next((n for n in h.step().new_seqs if n.seq_id == victim), None)
    assert len(resend.token_ids) > resend.prompt_len  # prompt + generated, recomputed from 0
    h.run()


def test_victim_is_lowest_priority_then_latest_arrival():
    # 2-token prompts take one block each; at the next token every sequence needs a second block.
    sched = make_scheduler(num_blocks=4, block_size=2)
    h = Harness(sched)
    h.add(add("a", [1, 2], priority=0, arrival=1.0, max_tokens=2, ignore_eos=True))
    h.add(add("b", [1, 2], priority=1, arrival=0.0, max_tokens=2, ignore_eos=True))
    h.add(add("c", [1, 2], priority=1, arrival=2.0, max_tokens=2, ignore_eos=True))
    h.step()
    with capture_logs() as logs:
        plan = h.step()
    assert [e["request_id"] for e in logs if e["event"] == "request.preempted"] == ["c"]
    assert plan.finished_seq_ids == [2] and [w.seq_id for w in plan.scheduled] == [0, 1]  # a first: best priority
    h.run()
    assert h.finished[("c", 0)].num_preemptions == 1 and h.finished[("a", 0)].num_preemptions == 0


def test_no_admission_in_a_step_that_had_to_preempt():
    h = Harness(make_scheduler(num_blocks=4, block_size=2, max_num_seqs=2))
    h.add(add("a", [1, 2], arrival=0.0, max_tokens=4, ignore_eos=True))  # 1 block, a 2nd at position 2
    h.add(add("b", [1] * 6, arrival=1.0, max_tokens=2, ignore_eos=True))  # 3 blocks
    h.step()
    h.add(add("c", [1], priority=-1, arrival=2.0, max_tokens=2, ignore_eos=True))  # fits once b is gone
    plan = h.step()
    assert plan.finished_seq_ids == [1] and plan.new_seqs == []  # b preempted; c waits a step
    assert [n.seq_id for n in h.step().new_seqs] == [2]
    h.run()


def test_the_last_sequence_preempts_itself_when_it_cannot_grow():
    sched = make_scheduler(num_blocks=3, block_size=2)
    h = Harness(sched)
    h.add(add("a", [1, 2, 3], arrival=0.0, max_tokens=3, ignore_eos=True))  # 2 blocks, then needs none
    h.add(add("b", [4, 5], arrival=1.0, max_tokens=3, ignore_eos=True))  # 1 block, then needs a second
    h.step()
    plan = h.step()
    assert plan.finished_seq_ids == [1] and [w.seq_id for w in plan.scheduled] == [0]
    h.run()
    assert set(h.finished) == {("a", 0), ("b", 0)}


def test_priority_then_arrival_order_decides_who_runs_first():
    h = Harness(make_scheduler(max_num_seqs=1))
    h.add(add("late-low", [1], priority=2, arrival=0.0, max_tokens=2, ignore_eos=True))
    h.add(add("high-2", [1], priority=0, arrival=5.0, max_tokens=2, ignore_eos=True))
    h.add(add("high-1", [1], priority=0, arrival=4.0, max_tokens=2, ignore_eos=True))
    h.add(add("mid", [1], priority=1, arrival=1.0, max_tokens=2, ignore_eos=True))
    h.run()
    order = [n.seq_id for p in h.plans for n in p.new_seqs]
    assert order == [2, 1, 3, 0]  # seq ids in add order: late-low 0, high-2 1, high-1 2, mid 3


def test_token_budget_limits_prefills_per_step():
    h = Harness(make_scheduler(max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False))
    for i in range(3):
        h.add(add(f"p{i}", [1] * 6, max_tokens=4, ignore_eos=True))
    assert [len(h.step().new_seqs) for _ in range(2)] == [2, 1]  # 6 + 6 fit, a third 6 does not
    h.run()


def test_max_num_seqs_caps_the_running_set():
    h = Harness(make_scheduler(max_num_seqs=2))
    for i in range(5):
        h.add(add(f"s{i}", [1, 2], max_tokens=3, ignore_eos=True))
    while h.scheduler.has_work():
        assert len(h.step().scheduled) <= 2
        assert h.scheduler.stats()["running"] <= 2


def test_a_request_needing_the_whole_cache_completes_among_others():
    msgs = [add("whole", [1] * 9, max_tokens=7, ignore_eos=True)] + workload(5)
    msgs = [m for m in msgs if len(m.prompt_token_ids) + m.params.max_tokens <= 16]
    sched = make_scheduler(num_blocks=16, block_size=1)
    h = run_all(sched, msgs)
    assert outputs_of(h, msgs) == expected(msgs, 256)


@pytest.mark.parametrize(("num_blocks", "block_size"), [(1, 4), (2, 1), (3, 2), (2, 8)])
def test_requests_that_each_fill_the_whole_cache_all_complete(num_blocks, block_size):
    capacity = num_blocks * block_size
    msgs = [add(f"f{i}", [i + 1] * (1 + i % (capacity - 1)), max_tokens=capacity - 1 - i % (capacity - 1),
                n=1 + i % 2, seed=i) for i in range(6)]
    h = run_all(make_scheduler(num_blocks=num_blocks, block_size=block_size), msgs)
    assert outputs_of(h, msgs) == expected(msgs, 256)


@st.composite
def tight_workloads(draw):
    """Up to 10 requests arriving over 20 steps into a cache barely larger
    than the biggest one; a few get aborted, a few are too long. Prompts share
    prefixes, so prefix caching gets hits; every memory-manager switch varies."""
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(4, 48))
    budget = draw(st.one_of(st.none(), st.integers(max_model_len // 2, 2 * max_model_len)))
    switches = dict(enable_chunked_prefill=draw(st.booleans()), enable_prefix_caching=draw(st.booleans()),
                    preemption_mode=draw(st.sampled_from(["recompute", "swap"])),
                    num_host_blocks=draw(st.integers(0, 12)))
    if switches["enable_chunked_prefill"]:
        budget = draw(st.one_of(st.none(), st.integers(1, 2 * max_model_len)))
    shared = [(j * 5) % 64 for j in range(max_model_len)]
    reqs = []
    for i in range(draw(st.integers(1, 10))):
        prompt_len = draw(st.integers(1, max_model_len // 2 + 1))
        common = draw(st.integers(0, prompt_len))
        reqs.append(dict(
            rid=f"r{i}", prompt=shared[:common] + [(i * 13 + j * 7) % 64 for j in range(prompt_len - common)],
            max_tokens=draw(st.one_of(st.none(), st.integers(1, max_model_len // 2 + 1))),
            n=draw(st.integers(1, 3)), priority=draw(st.integers(0, 2)), seed=draw(st.integers(0, 5)),
            ignore_eos=draw(st.booleans()), arrival=draw(st.integers(0, 20)),
            abort_at=draw(st.one_of(st.none(), st.none(), st.integers(0, 40))),
        ))
    sizes = [min(len(r["prompt"]) + (r["max_tokens"] or max_model_len), max_model_len) for r in reqs]
    most_blocks = -(-max(sizes) // block_size)
    num_blocks = draw(st.integers(max(1, most_blocks - 1), most_blocks + 3))
    max_num_seqs = draw(st.integers(1, 8))
    return block_size, max_model_len, budget, num_blocks, max_num_seqs, switches, reqs


def fits(r, *, block_size, max_model_len, num_blocks, budget, chunked) -> bool:
    """Admission's rule, restated: the whole sequence fits max_model_len, the
    cache, and (as a recompute prefill, unless chunked) the token budget."""
    prompt_len = len(r["prompt"])
    total = prompt_len + (r["max_tokens"] or max_model_len - prompt_len)
    return (prompt_len < max_model_len and total <= max_model_len and -(-total // block_size) <= num_blocks
            and (chunked or total - 1 <= (budget or max(max_model_len, 2048))))


@settings(max_examples=300, deadline=None)
@given(tight_workloads())
def test_every_admitted_request_completes_under_tight_caches(case):
    block_size, max_model_len, budget, num_blocks, max_num_seqs, switches, reqs = case
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, **switches)
    token_budget = budget or max(max_model_len, 2048)
    h = Harness(sched)
    admitted, aborts = [], {}  # aborts: step -> request ids
    step = 0
    while step <= 20 or sched.has_work():
        for r in reqs:
            if r["arrival"] == step:
                msg = add(r["rid"], r["prompt"], priority=r["priority"], arrival=float(step), n=r["n"],
                          max_tokens=r["max_tokens"], seed=r["seed"], ignore_eos=r["ignore_eos"])
                rejected = sched.add_request(msg, b"fe")
                admissible = fits(r, block_size=block_size, max_model_len=max_model_len, num_blocks=num_blocks,
                                  budget=budget, chunked=switches["enable_chunked_prefill"])
                assert (rejected is None) == admissible, (r, rejected)
                if admissible:
                    admitted.append(msg)
                    if r["abort_at"] is not None:
                        aborts.setdefault(step + r["abort_at"], []).append(r["rid"])
        h.record(sched.abort(aborts.pop(step, [])))
        sched.check_invariants()
        if sched.has_work():
            plan = h.step()
            assert sum(w.num_tokens for w in plan.scheduled) <= token_budget
            assert len(plan.scheduled) <= max(max_num_seqs, 3)  # one request's n outputs may exceed it alone
        step += 1
        assert step < 5000, "no progress"
    stats = sched.stats()
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0 and stats["host_blocks_used"] == 0
    if switches["preemption_mode"] == "recompute" or not switches["num_host_blocks"]:
        assert stats["preemptions_swap"] == 0
    for key, (tokens, reason) in expected(admitted, max_model_len).items():
        got = h.finished[key]
        if got.finish_reason == "abort":
            assert h.outputs[key] == tokens[: len(h.outputs[key])]
        else:
            assert (h.outputs[key], got.finish_reason) == (tokens, reason)
