"""Admission: what is rejected at once, with which code and message."""

from __future__ import annotations

import pytest
from sched_harness import Harness, add, make_scheduler
from structlog.testing import capture_logs

from shared.protocol import AddRequest, SamplingParams


def reject(sched, msg: AddRequest):
    rejected = sched.add_request(msg, b"fe")
    assert rejected is not None, "expected a rejection"
    assert rejected.request_id == msg.request_id
    return rejected.code, rejected.message


@pytest.mark.parametrize(
    ("prompt", "params", "words"),
    [
        ([], {}, ["prompt_token_ids", "empty"]),
        ([1, 64, 2], {}, ["prompt_token_ids[1] = 64", "[0, 64)"]),
        ([1, -1], {}, ["prompt_token_ids[1] = -1"]),
        ([1], {"n": 0}, ["n must be"]),
        ([1], {"max_tokens": 0}, ["max_tokens"]),
        ([1], {"temperature": -1.0}, ["temperature"]),
        ([1], {"top_p": 0.0}, ["top_p"]),
        ([1], {"stop_token_ids": [3, 99]}, ["stop_token_ids", "99"]),
    ],
)
def test_invalid_requests(prompt, params, words):
    code, message = reject(make_scheduler(), add("bad", prompt, **params))
    assert code == "invalid_request"
    for word in words:
        assert word in message


def test_non_finite_arrival_time_is_invalid():
    msg = AddRequest("t", [1], SamplingParams(), float("nan"))
    assert reject(make_scheduler(), msg)[0] == "invalid_request"


def test_over_max_model_len_is_too_long():
    sched = make_scheduler(max_model_len=32)
    code, message = reject(sched, add("long", [1] * 30, max_tokens=3))
    assert code == "too_long" and "max_model_len=32" in message and "33" in message
    assert sched.add_request(add("fits", [1] * 30, max_tokens=2), b"fe") is None


def test_no_room_to_generate_is_too_long():
    code, message = reject(make_scheduler(max_model_len=8), add("full", [1] * 8, max_tokens=None))
    assert code == "too_long" and "no room" in message


def test_over_the_whole_kv_cache_is_too_long():
    sched = make_scheduler(num_blocks=5, block_size=4)  # 20 tokens of KV
    code, message = reject(sched, add("big", [1] * 10, max_tokens=11))
    assert code == "too_long" and "6 KV blocks" in message and "has 5" in message
    assert sched.add_request(add("exact", [1] * 10, max_tokens=10), b"fe") is None


def test_over_the_token_budget_is_too_long_without_chunked_prefill():
    sched = make_scheduler(max_model_len=64, max_num_batched_tokens=16, enable_chunked_prefill=False)
    code, message = reject(sched, add("big", [1] * 10, max_tokens=8))  # a recompute could prefill 17
    assert code == "too_long" and "max_num_batched_tokens=16" in message
    assert sched.add_request(add("ok", [1] * 10, max_tokens=7), b"fe") is None


def test_chunked_prefill_admits_prompts_over_the_token_budget():
    h = Harness(make_scheduler(max_model_len=64, max_num_batched_tokens=16))
    h.add(add("big", [1] * 40, max_tokens=8, ignore_eos=True))
    h.run()
    assert [sum(w.num_tokens for w in p.scheduled) for p in h.plans[:3]] == [16, 16, 8]
    assert len(h.outputs[("big", 0)]) == 8


def test_duplicate_in_flight_id_is_invalid_but_reusable_after_finishing():
    h = Harness(make_scheduler())
    h.add(add("dup", [1, 2], max_tokens=2))
    code, message = reject(h.scheduler, add("dup", [3], max_tokens=2))
    assert code == "invalid_request" and "already in flight" in message
    h.run()
    h.add(add("dup", [3], max_tokens=2))


def test_a_rejection_is_logged_and_leaves_no_state():
    sched = make_scheduler(max_model_len=16)
    with capture_logs() as logs:
        reject(sched, add("long", [1] * 10, max_tokens=10))
    assert [(e["event"], e["request_id"], e["code"]) for e in logs] == [("request.rejected", "long", "too_long")]
    stats = sched.stats()
    assert not sched.has_work() and stats["requests_in_flight"] == 0 and stats["requests_rejected"] == 1
    sched.check_invariants()
