"""The memory manager through the scheduler and a fake worker: prefix caching,
swap, chunked prefill, priorities, and a long random run."""

from __future__ import annotations

import random

from sched_harness import Harness, add, make_scheduler, reference_output
from structlog.testing import capture_logs

SYSTEM = [(7 * j) % 60 + 1 for j in range(12)]  # a 12-token "system prompt": 3 blocks of 4


def finished_outputs(h: Harness, msgs):
    return {(m.request_id, i): (h.outputs[(m.request_id, i)], h.finished[(m.request_id, i)].finish_reason)
            for m in msgs for i in range(m.params.n)}


def expected(msgs, max_model_len=256):
    return {(m.request_id, i): reference_output(m.prompt_token_ids, m.params, i, max_model_len=max_model_len)
            for m in msgs for i in range(m.params.n)}


def test_a_shared_prefix_is_computed_once_and_hits_are_counted():
    h = Harness(make_scheduler(block_size=4))
    first = add("a", SYSTEM + [1, 2], max_tokens=3, ignore_eos=True)
    h.add(first)
    h.run()
    second = add("b", SYSTEM + [3, 4, 5], max_tokens=3, ignore_eos=True)
    h.add(second)
    plan = h.step()
    # The system prompt's 3 full blocks are found; only the 3 new tokens are computed.
    assert [(w.num_tokens, w.num_computed_tokens) for w in plan.scheduled] == [(3, 12)]
    assert plan.new_seqs[0].block_ids[:3] == h.plans[0].new_seqs[0].block_ids[:3]
    h.run()
    stats = h.scheduler.stats()
    assert stats["prefix_cache_hit_tokens"] == 12 and stats["prefix_cache_queried_tokens"] == 14 + 15
    assert finished_outputs(h, [first, second]) == expected([first, second])


def test_a_fully_cached_prompt_still_computes_its_last_token():
    h = Harness(make_scheduler(block_size=4))
    msg = add("a", SYSTEM, max_tokens=2, ignore_eos=True)
    h.add(msg)
    h.run()
    h.add(add("again", SYSTEM, max_tokens=2, ignore_eos=True))
    plan = h.step()
    # 12 tokens = 3 full cached blocks, but the step must end with logits: block 2 is recomputed.
    assert [(w.num_tokens, w.num_computed_tokens) for w in plan.scheduled] == [(4, 8)]
    h.run()
    assert h.outputs[("again", 0)] == h.outputs[("a", 0)]


def test_recompute_after_preemption_reuses_blocks_still_cached():
    msgs = [add(f"r{i}", SYSTEM + [i + 1] * 3, max_tokens=12, seed=i, ignore_eos=True) for i in range(4)]
    h = Harness(make_scheduler(num_blocks=14, block_size=4))
    for m in msgs:
        h.add(m)
    h.run()
    stats = h.scheduler.stats()
    assert stats["preemptions_recompute"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert finished_outputs(h, msgs) == expected(msgs)


def test_swap_preemption_keeps_kv_on_the_host_and_outputs_match():
    msgs = [add(f"r{i}", [(5 * i + j) % 60 + 1 for j in range(3 + i)], max_tokens=20, seed=i, n=1 + (i == 2))
            for i in range(6)]
    with capture_logs() as logs:
        h = Harness(make_scheduler(num_blocks=16, block_size=2, num_host_blocks=64, preemption_mode="swap"))
        for m in msgs:
            h.add(m)
        h.run()
    stats = h.scheduler.stats()
    assert stats["preemptions_swap"] > 0 and stats["preemptions_recompute"] == 0
    assert stats["blocks_swapped_out"] > 0 and stats["blocks_swapped_in"] > 0 and stats["host_blocks_used"] == 0
    assert finished_outputs(h, msgs) == expected(msgs)
    swaps = [e for e in logs if e["event"] == "request.preempted"]
    assert swaps and all(e["mode"] == "swap" and e["tokens_to_recompute"] == 0 for e in swaps)
    resumed = [n for p in h.plans if p.swap_in for n in p.new_seqs]
    assert resumed and any(len(n.token_ids) > n.prompt_len for n in resumed)  # back with generated tokens


def test_swap_falls_back_to_recompute_when_host_blocks_are_short():
    msgs = [add(f"r{i}", [i + 1] * 6, max_tokens=20, seed=i) for i in range(5)]
    h = Harness(make_scheduler(num_blocks=16, block_size=2, num_host_blocks=4, preemption_mode="swap"))
    for m in msgs:
        h.add(m)
    h.run()
    stats = h.scheduler.stats()
    assert stats["preemptions_recompute"] > 0
    assert finished_outputs(h, msgs) == expected(msgs)


def test_swapped_sequences_resume_before_new_ones_are_admitted():
    h = Harness(make_scheduler(num_blocks=6, block_size=2, num_host_blocks=10, preemption_mode="swap",
                               max_num_seqs=4))
    h.add(add("a", [1, 2, 3], arrival=0.0, max_tokens=6, ignore_eos=True))
    h.add(add("b", [4, 5, 6], arrival=1.0, max_tokens=6, ignore_eos=True))
    while h.scheduler.stats()["swapped"] == 0:
        h.step()
    h.add(add("new", [7], priority=-5, arrival=2.0, max_tokens=2, ignore_eos=True))  # better priority, yet new
    order = []
    while h.scheduler.has_work():
        plan = h.step()
        order += [n.seq_id for n in plan.new_seqs if n.seq_id != 0]
    assert order.index(1) < order.index(2)  # b (swapped) came back before "new" was admitted


def test_chunked_prefill_lets_decodes_go_on():
    h = Harness(make_scheduler(max_model_len=128, max_num_batched_tokens=8))
    h.add(add("decode", [1, 2], arrival=0.0, max_tokens=30, ignore_eos=True))
    h.step()
    h.add(add("long", [3] * 40, arrival=1.0, max_tokens=2, ignore_eos=True))
    chunks = []
    while ("long", 0) not in h.finished:
        plan = h.step()
        assert sum(w.num_tokens for w in plan.scheduled) <= 8
        assert plan.scheduled[0].seq_id == 0 and plan.scheduled[0].num_tokens == 1  # the decode every step
        chunks += [w.num_tokens for w in plan.scheduled if w.seq_id == 1]
    assert chunks[:6] == [7] * 5 + [5] and h.scheduler.stats()["partial_prefills"] == 5
    h.run()


def test_worker_restart_turns_swapped_sequences_into_recomputes():
    h = Harness(make_scheduler(num_blocks=6, block_size=2, num_host_blocks=10, preemption_mode="swap"))
    msgs = [add(f"r{i}", [i + 1, i + 2, i + 3], max_tokens=8, seed=i, ignore_eos=True) for i in range(3)]
    for m in msgs:
        h.add(m)
    while h.scheduler.stats()["swapped"] == 0:
        h.step()
    h.scheduler.on_worker_restart()
    h.worker = type(h.worker)(2)
    stats = h.scheduler.stats()
    assert stats["swapped"] == 0 and stats["host_blocks_used"] == 0 and stats["kv_blocks_cached"] == 0
    h.run()
    assert finished_outputs(h, msgs) == expected(msgs)


def test_thousands_of_random_steps_finish_every_request_exactly_once():
    rng = random.Random(1234)
    sched = make_scheduler(num_blocks=40, block_size=4, max_model_len=96, max_num_seqs=6, max_num_batched_tokens=24,
                           num_host_blocks=20, preemption_mode="swap")
    h = Harness(sched)
    admitted, aborted, step, low = [], set(), 0, None
    while step < 3000 or sched.has_work():
        if step < 3000 and rng.random() < 0.15:
            i = len(admitted)
            prompt = SYSTEM[:rng.randrange(0, 12)] + [rng.randrange(1, 64) for _ in range(rng.randrange(1, 30))]
            msg = add(f"r{i}", prompt, priority=rng.randrange(3), arrival=float(step), n=rng.choice([1, 1, 2, 3]),
                      max_tokens=rng.randrange(1, 40), seed=i)
            if low is None and msg.params.n == 1:
                msg.priority, low = 9, msg  # the lowest priority of all: must still finish
            assert sched.add_request(msg, b"fe") is None
            admitted.append(msg)
        if admitted and rng.random() < 0.01:
            victim = rng.choice(admitted).request_id
            if victim != low.request_id:
                aborted.add(victim)
                h.record(sched.abort([victim]))
        if sched.has_work():
            plan = h.step()
            assert sum(w.num_tokens for w in plan.scheduled) <= 24
        step += 1
        assert step < 20_000, "no progress"
    stats = sched.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0 and stats["kv_blocks_used"] == 0
    assert set(h.finished) == {(m.request_id, i) for m in admitted for i in range(m.params.n)}  # once each
    want = expected(admitted, 96)
    for key, delta in h.finished.items():
        if delta.finish_reason == "abort":
            assert key[0] in aborted and h.outputs[key] == want[key][0][:len(h.outputs[key])]
        else:
            assert (h.outputs[key], delta.finish_reason) == want[key]
    assert h.finished[(low.request_id, 0)].finish_reason != "abort"
