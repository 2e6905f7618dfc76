"""Decode-first (stall-free) steps with a fake worker: no decode misses a step for a prefill,
chunks stay under the cap, budgets under the target, preempted sequences resume beside decodes.

The timed worker reports step times from a known linear machine, so "under the target" is a
statement about the model the scheduler learned, never about wall-clock time."""

from __future__ import annotations

import pytest
from sched_harness import FakeWorker, Harness, add, reference_output

from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import SamplingParams, StepPlan, StepResult

FIXED_MS, MS_PER_TOKEN = 20.0, 0.1  # the timed worker's machine: a step of t tokens takes 20 + 0.1 t ms


class TimedWorker(FakeWorker):
    def run(self, plan: StepPlan) -> StepResult:
        result = super().run(plan)
        result.step_time_s = (FIXED_MS + MS_PER_TOKEN * sum(w.num_tokens for w in plan.scheduled)) / 1000
        return result


def make(*, num_blocks=4000, block_size=16, max_model_len=8192, num_host_blocks=0, timed=False,
         **settings) -> Harness:
    config = ServerConfig.from_settings(**{"batching_policy": "decode_first", **settings})
    config.validate()
    scheduler = Scheduler(config.scheduler, num_device_blocks=num_blocks, block_size=block_size,
                          max_model_len=max_model_len, vocab_size=64, eos_token_ids=[0],
                          num_host_blocks=num_host_blocks)
    h = Harness(scheduler)
    if timed:
        h.worker = TimedWorker(block_size)
    return h


def decoding(h: Harness) -> dict[int, int]:
    """Running sequences with exactly one token to compute -> their preemptions so far."""
    return {s.seq_id: s.num_preemptions for s in h.scheduler.policy.running
            if s.compute_limit - s.num_computed_tokens == 1}


def step_checked(h: Harness) -> StepPlan:
    """One step; every sequence decoding before it got its token, unless it was preempted."""
    before = decoding(h)
    plan = h.step()
    tokens = {w.seq_id: w.num_tokens for w in plan.scheduled}
    for seq_id, preemptions in before.items():
        seq = h.scheduler.get_sequence(seq_id)
        assert tokens.get(seq_id) == 1 or (seq is not None and seq.num_preemptions > preemptions), \
            f"step {plan.step_id}: decoding sequence {seq_id} missed the step"
    return plan


def expect_reference(h: Harness, msgs, max_model_len=8192) -> None:
    for msg in msgs:
        tokens, reason = reference_output(msg.prompt_token_ids, msg.params, 0, max_model_len=max_model_len)
        assert h.outputs[(msg.request_id, 0)] == tokens and h.finished[(msg.request_id, 0)].finish_reason == reason


def _decoders(n: int, max_tokens: int = 60):
    return [add(f"d{i}", [1 + i % 50, 2, 3, 4, 5, 6, 7, 8], max_tokens=max_tokens, ignore_eos=True, arrival=1.0 + i)
            for i in range(n)]


def _start_decoding(h: Harness, msgs) -> None:
    for msg in msgs:
        h.add(msg)
    while len(decoding(h)) < len(msgs):
        h.step()


@pytest.mark.parametrize("priority", [0, -1])  # -1: the long prompt goes ahead of the decodes in policy order
def test_a_4000_token_prompt_among_32_decoding_sequences_stalls_none(priority):
    h = make(max_num_batched_tokens=1024)
    decoders = _decoders(32)
    _start_decoding(h, decoders)
    long = add("long", [(7 * i) % 60 + 1 for i in range(4000)], max_tokens=8, ignore_eos=True, priority=priority,
               arrival=100.0)
    h.add(long)
    cap = h.scheduler.policy.chunk_cap
    assert cap == 327  # 4% of max_model_len 8192
    long_chunks = []
    while h.scheduler.has_work():
        plan = step_checked(h)
        long_id = h.scheduler.get_request("long").seqs[0].seq_id if h.scheduler.get_request("long") else None
        long_chunks += [w.num_tokens for w in plan.scheduled if w.seq_id == long_id and w.num_tokens > 1]
        assert sum(w.num_tokens for w in plan.scheduled) <= 1024
    assert all(n <= cap for n in long_chunks) and sum(long_chunks) >= 3999
    expect_reference(h, [*decoders, long])


def test_fcfs_lets_a_prefill_ahead_of_the_decodes_take_the_step():
    """The policy before, kept to compare: what the test above rules out does happen there."""
    h = make(max_num_batched_tokens=1024, batching_policy="fcfs")
    _start_decoding(h, _decoders(32))
    h.add(add("long", [5] * 4000, max_tokens=4, ignore_eos=True, priority=-1, arrival=100.0))
    h.step()  # admitted with what the decodes left; from now on it runs ahead of them
    before = decoding(h)
    plan = h.step()
    assert [w.num_tokens for w in plan.scheduled] == [1024]  # the prefill took the whole step
    assert not {w.seq_id for w in plan.scheduled} & before.keys()


def test_chunk_caps_hold_and_partial_prefills_share_a_step():
    h = make(long_prefill_token_threshold=100, max_num_batched_tokens=512)
    prompts = [add(f"p{i}", [i + 1] * (250 + 37 * i), max_tokens=5, ignore_eos=True, arrival=float(i))
               for i in range(6)]
    for msg in prompts:
        h.add(msg)
    shared = 0
    while h.scheduler.has_work():
        plan = step_checked(h)
        chunks = [w.num_tokens for w in plan.scheduled if w.num_tokens > 1]
        assert all(n <= 100 for n in chunks) and sum(w.num_tokens for w in plan.scheduled) <= 512
        shared = max(shared, len(chunks))
    assert shared >= 5  # 512 tokens of budget: five 100-token chunks of five prompts in one step
    expect_reference(h, prompts)


def test_budgets_respect_the_target_under_the_step_time_model():
    target = 50.0  # ms: 20 fixed + 0.1 per token allows 300 tokens a step
    h = make(timed=True, target_tpot_ms=target, long_prefill_token_threshold=0, max_num_batched_tokens=2048)
    decoders = _decoders(16, max_tokens=80)
    _start_decoding(h, decoders)
    longs = [add(f"long{i}", [i + 1] * 1500, max_tokens=4, ignore_eos=True, arrival=50.0 + i) for i in range(3)]
    for msg in longs:
        h.add(msg)
    sizes = []
    while h.scheduler.has_work():
        has_decodes = bool(decoding(h))
        plan = step_checked(h)
        if has_decodes:
            sizes.append(sum(w.num_tokens for w in plan.scheduled))
    warm = sizes[3:]  # the model needs a few steps of different sizes to tell fixed from per-token cost
    assert all(FIXED_MS + MS_PER_TOKEN * n <= target + 1e-6 for n in warm), max(warm)
    assert max(warm) >= 290  # and the budget is used, not just respected
    stats = h.scheduler.stats()
    assert stats["step_model_ms_per_token"] == pytest.approx(MS_PER_TOKEN, rel=0.01)
    assert stats["step_model_fixed_ms"] == pytest.approx(FIXED_MS, rel=0.01)
    assert stats["steps_over_target_misprediction"] == 0 and stats["steps_over_target_decodes"] == 0
    assert stats["step_decode_tokens"] + stats["step_prefill_tokens"] == sum(
        w.num_tokens for p in h.plans for w in p.scheduled)
    expect_reference(h, [*decoders, *longs])


def test_admission_waits_for_budget_and_priority_still_orders_the_queue():
    """Overload under a target: the running decodes keep their steps short; requests wait."""
    h = make(timed=True, target_tpot_ms=25.0, max_num_batched_tokens=2048)  # 50 tokens a step
    _start_decoding(h, _decoders(8, max_tokens=200))
    for _ in range(4):
        h.step()  # the model learns from decode steps and the prefills above
    late = [add(f"w{i}", [3] * 400, max_tokens=3, ignore_eos=True, arrival=200.0 + i) for i in range(10)]
    urgent = add("urgent", [4] * 400, max_tokens=3, ignore_eos=True, priority=-5, arrival=300.0)
    for msg in late + [urgent]:
        h.add(msg)
    started, waiting_peak = [], 0
    while h.scheduler.has_work():
        waiting_peak = max(waiting_peak, h.scheduler.stats()["waiting"])
        busy = bool(decoding(h))
        plan = step_checked(h)
        for new in plan.new_seqs:
            request_id = h.scheduler.get_sequence(new.seq_id).request_id
            if request_id not in started and request_id[0] in "wu":
                started.append(request_id)
        if busy:
            assert sum(w.num_tokens for w in plan.scheduled) <= 50  # 20 + 0.1 * 50 = 25 ms
    assert waiting_peak >= 10  # the queue took the overload, not the steps
    assert started == ["urgent", *(msg.request_id for msg in late)]  # priority, then arrival


def test_past_the_target_running_prefills_keep_a_floor_and_nothing_joins():
    """The decodes alone take longer than the target (16 decodes; 10 tokens fit 21 ms): a prompt
    already running still prefills 16 tokens a step, a new one waits until the decodes thin out."""
    h = make(timed=True, target_tpot_ms=21.0, max_num_batched_tokens=2048)
    decoders = _decoders(16, max_tokens=40)
    long = add("long", [9] * 1200, max_tokens=3, ignore_eos=True, arrival=50.0)
    late = add("late", [8] * 20, max_tokens=3, ignore_eos=True, arrival=60.0)
    for msg in [*decoders, long]:
        h.add(msg)
    for _ in range(6):
        step_checked(h)  # cold start and learning; the long prompt is in
    long_id = h.scheduler.get_request("long").seqs[0].seq_id
    h.add(late)
    late_joined_beside, floor_steps = None, 0
    while h.scheduler.has_work():
        busy = len(decoding(h))
        plan = step_checked(h)
        chunks = {w.seq_id: w.num_tokens for w in plan.scheduled if w.num_tokens > 1}
        if busy >= 10 and long_id in chunks:
            assert chunks[long_id] == 16 or sum(chunks.values()) < 16  # the floor, or the prompt's last chunk
            floor_steps += 1
        if late_joined_beside is None and any(n.token_ids == late.prompt_token_ids for n in plan.new_seqs):
            late_joined_beside = busy
    assert floor_steps >= 20 and late_joined_beside is not None and late_joined_beside < 10
    expect_reference(h, [*decoders, long, late])


def test_a_burst_gets_only_the_seats_the_target_has_room_for():
    """With nothing decoding a step may prefill a lot, but only as many sequences join as can
    then decode within the target together (22 ms: 20 tokens), so their TPOT holds; the rest wait."""
    h = make(timed=True, target_tpot_ms=22.0, max_num_batched_tokens=2048)
    warm = add("warm", [7] * 100, max_tokens=6, ignore_eos=True)
    h.add(warm)
    h.run()  # a 100-token step and decode steps: the model knows the fixed and the per-token cost
    burst = [add(f"b{i}", [1 + i % 50] * 12, max_tokens=10, ignore_eos=True, arrival=10.0 + i) for i in range(40)]
    for msg in burst:
        h.add(msg)
    most = 0
    while h.scheduler.has_work():
        step_checked(h)
        most = max(most, len(h.scheduler.policy.running))
    assert most == 20
    expect_reference(h, [warm, *burst])


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_sequences_resume_without_starving_decodes(mode):
    h = make(num_blocks=60, block_size=8, max_num_batched_tokens=256, long_prefill_token_threshold=64,
             preemption_mode=mode, num_host_blocks=200 if mode == "swap" else 0)
    msgs = [add(f"r{i}", [(i * 5 + j) % 60 + 1 for j in range(40 + 13 * i)], max_tokens=40, ignore_eos=True,
                arrival=float(i)) for i in range(8)]
    arrivals = {3 * i: [msg] for i, msg in enumerate(msgs)}
    steps = 0
    while arrivals or h.scheduler.has_work():
        for msg in arrivals.pop(steps, []):
            h.add(msg)
        if h.scheduler.has_work():
            plan = step_checked(h)
            assert all(w.num_tokens <= 64 for w in plan.scheduled)
        steps += 1
        assert steps < 5000
    stats = h.scheduler.stats()
    assert stats[f"preemptions_{mode}"] > 0
    expect_reference(h, msgs)
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0


def test_fcfs_still_gives_the_reference_tokens_under_preemption():
    h = make(num_blocks=60, block_size=8, max_num_batched_tokens=256, batching_policy="fcfs")
    msgs = [add(f"r{i}", [(i * 5 + j) % 60 + 1 for j in range(40 + 13 * i)], max_tokens=40, ignore_eos=True,
                arrival=float(i)) for i in range(8)]
    h.run({3 * i: [msg] for i, msg in enumerate(msgs)})
    assert h.scheduler.stats()["preemptions_recompute"] > 0 and not h.scheduler.policy.decode_first
    expect_reference(h, msgs)


def test_default_config_is_decode_first_with_the_stats():
    h = make()
    h.add(add("a", [1, 2, 3], max_tokens=3, ignore_eos=True))
    h.run()
    stats = h.scheduler.stats()
    assert h.scheduler.policy.decode_first
    assert stats["step_decode_tokens"] == 2 and stats["step_prefill_tokens"] == 3
    assert stats["steps_over_target"] == 0 and "target_tpot_ms" not in stats
    assert stats["step_token_budget"] == 8192


def test_n_outputs_fork_under_decode_first():
    h = make(long_prefill_token_threshold=3, block_size=4)
    msg = add("n", [3, 1, 4, 1, 5, 9, 2, 6], n=3, max_tokens=6, seed=5, ignore_eos=True)
    h.add(msg)
    while h.scheduler.has_work():
        step_checked(h)
    for index in range(3):
        tokens, _ = reference_output(msg.prompt_token_ids, SamplingParams(n=3, max_tokens=6, seed=5, ignore_eos=True),
                                     index, max_model_len=8192)
        assert h.outputs[("n", index)] == tokens
