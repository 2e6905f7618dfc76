"""Beam search in the scheduler: the same hypotheses and scores as transformers' algorithm (its
NumPy transcription in beam_harness.py) on a toy model, whatever the cache does (sharing,
copy-on-write, preemption by recompute or swap, chunked prefill, a worker restart), with blocks
shared between beams, and n deltas on finish or abort."""

from __future__ import annotations

import pytest
from beam_harness import BeamHarness, reference_beam_search
from sched_harness import add, make_scheduler

PROMPTS = [[3, 9, 27, 17, 51, 25, 11], [5, 6], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7]]


def _beam(rid, prompt, width, n, max_tokens=12, **extra):
    return add(rid, prompt, use_beam_search=True, best_of=width, n=n, temperature=0.0, max_tokens=max_tokens,
               arrival=float(len(rid)), **extra)


def _check(h, rid, prompt, width, n, max_tokens=12, length_penalty=1.0, early_stopping=False):
    expected = reference_beam_search(prompt, width=width, n=n, max_new=max_tokens, length_penalty=length_penalty,
                                     early_stopping=early_stopping)
    for index, (tokens, score) in enumerate(expected):
        delta = h.finished[(rid, index)]
        assert h.outputs[(rid, index)] == tokens, f"{rid} output {index}"
        assert delta.beam_score == pytest.approx(score, abs=1e-6)
        assert delta.finish_reason in ("stop", "length")
    assert (rid, n) not in h.finished


@pytest.mark.parametrize("width,n,length_penalty,early_stopping", [
    (2, 1, 1.0, False), (4, 2, 1.0, True), (4, 4, 0.5, "never"), (8, 3, 2.0, False), (3, 3, -1.0, "never"),
])
def test_beams_match_the_reference(width, n, length_penalty, early_stopping):
    h = BeamHarness(make_scheduler(block_size=4))
    for i, prompt in enumerate(PROMPTS):
        h.add(_beam(f"r{i}", prompt, width, n, length_penalty=length_penalty, early_stopping=early_stopping))
    h.add(add("plain", [1, 2, 3], max_tokens=8))  # an ordinary request in the same steps
    h.run()
    for i, prompt in enumerate(PROMPTS):
        _check(h, f"r{i}", prompt, width, n, length_penalty=length_penalty, early_stopping=early_stopping)
    stats = h.scheduler.stats()
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0
    assert stats["beam_requests_finished"] == len(PROMPTS) and stats["beam_forks"] > 0
    assert 0 < stats["beam_kv_blocks_shared"] < stats["beam_kv_blocks_unshared"]
    assert any(plan.copy for plan in h.plans), "a forked beam's shared last block is copied on write"


@pytest.mark.parametrize("mode,host", [("recompute", 0), ("swap", 64)])
def test_beams_survive_preemption(mode, host):
    h = BeamHarness(make_scheduler(num_blocks=44, block_size=2, num_host_blocks=host, preemption_mode=mode))
    prompts = PROMPTS + [prompt[::-1] + [1] for prompt in PROMPTS]
    for i, prompt in enumerate(prompts):
        h.add(_beam(f"r{i}", prompt, 4, 2, max_tokens=10))
    h.run()
    stats = h.scheduler.stats()
    assert stats["preemptions"] > 0 and stats["beams_parked"] > 0
    for i, prompt in enumerate(prompts):
        _check(h, f"r{i}", prompt, 4, 2, max_tokens=10)
    assert stats["kv_blocks_used"] == 0


def test_beams_survive_a_worker_restart():
    h = BeamHarness(make_scheduler(block_size=4))
    h.add(_beam("r", PROMPTS[0], 4, 2))
    for _ in range(4):
        h.step()
    h.scheduler.on_worker_restart()
    h.worker = type(h.worker)(4)
    h.run()
    _check(h, "r", PROMPTS[0], 4, 2)


def test_abort_ends_every_output_and_frees_the_blocks():
    h = BeamHarness(make_scheduler(block_size=4))
    h.add(_beam("r", PROMPTS[0], 4, 3, max_tokens=30))
    for _ in range(5):
        h.step()
    outputs = h.scheduler.abort(["r"])
    assert sorted((d.index, d.finish_reason) for _, d in outputs) == [(0, "abort"), (1, "abort"), (2, "abort")]
    h.scheduler.check_invariants()
    assert h.scheduler.stats()["kv_blocks_used"] == 0 and not h.scheduler.has_work()
    h.scheduler.schedule()  # the drops ride with the next plan; nothing of "r" remains
    h.scheduler.check_invariants()


def test_resubmission_restarts_from_the_prompt():
    h = BeamHarness(make_scheduler(block_size=4))
    msg = _beam("r", PROMPTS[1], 2, 2)
    msg.output_token_ids = [[], []]
    h.add(msg)
    h.run()
    _check(h, "r", PROMPTS[1], 2, 2)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_chunked_prefill_and_prefix_caching_change_nothing(prefix_caching):
    h = BeamHarness(make_scheduler(block_size=4, max_num_batched_tokens=5, enable_prefix_caching=prefix_caching))
    prompts = [PROMPTS[2] * 2, PROMPTS[2] * 2 + [8, 9], PROMPTS[0]]  # a shared prefix, prefilled in chunks
    for i, prompt in enumerate(prompts):
        h.add(_beam(f"c{i}", prompt, 3, 2, max_tokens=8))
    h.run()
    assert h.scheduler.stats()["partial_prefills"] > 0
    assert (h.scheduler.stats()["prefix_cache_hit_tokens"] > 0) == prefix_caching
    for i, prompt in enumerate(prompts):
        _check(h, f"c{i}", prompt, 3, 2, max_tokens=8)


def test_stop_token_ids_end_hypotheses_like_eos():
    h = BeamHarness(make_scheduler(block_size=4))
    h.add(_beam("s", PROMPTS[0], 4, 2, max_tokens=12, stop_token_ids=[5, 9]))
    h.run()
    expected = reference_beam_search(PROMPTS[0], width=4, n=2, max_new=12, eos=frozenset({0, 5, 9}))
    assert [h.outputs[("s", i)] for i in range(2)] == [tokens for tokens, _ in expected]


def test_finish_outputs_leaves_a_beam_search_alone():
    h = BeamHarness(make_scheduler(block_size=4))
    h.add(_beam("r", PROMPTS[0], 4, 2))
    for _ in range(3):
        h.step()
    assert h.scheduler.finish_outputs([("r", 0), ("r", 1)]) == []
    h.run()
    _check(h, "r", PROMPTS[0], 4, 2)
