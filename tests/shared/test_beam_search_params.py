"""Beam-search parameters: validated by name, rejected with what they cannot be combined with,
the group bound at admission, and the new fields round-trip on the wire."""

from __future__ import annotations

import msgspec
import pytest

from shared import protocol as p
from shared.client_base import beam_search_params
from shared.validation import Limits, Rejected, check_request


def _beam(**kwargs) -> p.SamplingParams:
    return p.SamplingParams(**{"use_beam_search": True, "temperature": 0.0, **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    ({"best_of": 1, "n": 2}, "best_of"), ({"best_of": p.MAX_BEAM_WIDTH + 1}, "best_of"),
    ({"length_penalty": float("nan")}, "length_penalty"), ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"temperature": 0.7}, "temperature 0"), ({"top_p": 0.9}, "top_p"), ({"top_k": 5}, "top_k"),
    ({"logprobs": 2}, "logprobs"), ({"stop": ["\n"]}, "stop"), ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_tokens": 2}, "min_tokens"), ({"prompt_logprobs": 0}, "prompt_logprobs"),
])
def test_bad_beam_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _beam(**kwargs).validate(1000)


def test_best_of_without_beam_search_is_refused():
    with pytest.raises(ValueError, match="needs use_beam_search"):
        p.SamplingParams(best_of=3).validate(1000)


def test_valid_beam_params_pass_and_width_defaults_to_n():
    for early in (True, False, "never"):
        _beam(n=3, early_stopping=early, length_penalty=-1.0).validate(1000)
    assert _beam(n=3).beam_width == 3 and _beam(n=2, best_of=5).beam_width == 5
    assert beam_search_params(4, n=2).beam_width == 4


def test_the_group_must_fit_the_cache_unshared():
    limits = Limits(max_model_len=1024, vocab_size=1000, num_device_blocks=10, block_size=4, max_num_batched_tokens=512)
    assert check_request([1] * 4, _beam(best_of=2, max_tokens=16), limits) == 16  # 2 x 5 blocks
    with pytest.raises(Rejected, match="beam search with 4 beams") as e:
        check_request([1] * 4, _beam(best_of=4, max_tokens=16), limits)
    assert e.value.code is p.ErrorCode.TOO_LONG


def test_beam_fields_round_trip():
    msg = p.Generate(request_id="x", prompt="hi", params=_beam(n=2, best_of=4, early_stopping="never"))
    back = p.decoder_for(p.ClientMessage).decode(p.encode(msg))
    assert back.params == msg.params
    result = p.StepResult(3, [-1, 7], candidates=[p.BeamCandidates([1, 2], [-0.5, -1.5]), None])
    assert p.decoder_for(p.WorkerMessage).decode(p.encode(result)) == result
    plan = p.StepPlan(1, [p.ScheduledSeq(4, 1, 9, num_candidates=8, append_token_ids=[5])])
    assert p.decoder_for(p.PlanMessage).decode(p.encode(plan)) == plan
    out = p.CompletionOutput(index=0, text="a", token_ids=[1], finish_reason="stop", cumulative_logprob=-1.0,
                             beam_score=-0.5)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=p.CompletionOutput) == out
