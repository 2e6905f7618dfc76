"""SamplingParams: vLLM's names, defaults that old clients rely on, and validation naming the field."""

from __future__ import annotations

import msgspec
import pytest

from shared import protocol as p


@pytest.mark.parametrize("kwargs,field", [
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.5}, "min_p"), ({"min_p": float("nan")}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"stop_token_ids": list(range(p.MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
    ({"temperature": float("inf")}, "temperature"), ({"seed": 2**63}, "seed"),
])
def test_new_fields_are_validated_by_name(kwargs, field):
    params = p.SamplingParams(**kwargs)  # construction never raises
    with pytest.raises(ValueError, match=field):
        params.validate(vocab_size=100_000)


def test_valid_extremes_pass():
    p.SamplingParams(min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=0.5,
                     min_tokens=16, max_tokens=16, logprobs=20, prompt_logprobs=0, seed=-(2**63)).validate(1000)
    p.SamplingParams(max_tokens=None, min_tokens=100).validate(1000)


def test_an_old_client_message_still_decodes_with_the_defaults():
    old = msgspec.msgpack.encode({"kind": "generate", "request_id": "x", "prompt": "hi",
                                  "params": {"max_tokens": 3, "temperature": 0.5}})
    msg = p.decoder_for(p.ClientMessage).decode(old)
    assert (msg.params.min_p, msg.params.repetition_penalty, msg.params.logprobs, msg.params.min_tokens) == \
        (0.0, 1.0, None, 0)


def test_logprob_messages_roundtrip():
    item = p.TokenLogprobs(5, -0.25, 2, [3, 5], [-0.1, -0.25])
    completion = p.Completion(request_id="r", outputs=[p.CompletionOutput(index=0, text="a", token_ids=[5],
                                                                          finish_reason="stop", logprobs=[item])],
                              prompt_tokens=2, completion_tokens=1, prompt_logprobs=[None, item])
    assert p.decoder_for(p.ServerMessage).decode(p.encode(completion)) == completion
    result = p.StepResult(1, [5, -1], 0.1, logprobs=[item, None], prompt_logprobs=[[item], []])
    assert p.decoder_for(p.WorkerMessage).decode(p.encode(result)) == result
    abort = p.FinishOutputs([("r", 1)])
    assert p.decoder_for(p.FrontendMessage).decode(p.encode(abort)) == abort
    assert isinstance(p.decoder_for(p.ServerMessage).decode(p.encode(p.KeepAlive())), p.KeepAlive)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens must be >= 1"),
    ({"max_tokens": -3, "min_tokens": 2}, "max_tokens must be >= 1"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"min_tokens": -1, "max_tokens": 4}, "min_tokens must be >= 0"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens (5) must be <= max_tokens (4)"),
    ({"n": 0, "min_tokens": 9, "max_tokens": 1}, "n must be"),
    ({"top_p": 0.0, "min_tokens": 9, "max_tokens": 1}, "top_p"),
    ({"logprobs": 99, "min_tokens": 9, "max_tokens": 1}, "logprobs"),
])
def test_the_message_names_the_field_actually_wrong(kwargs, field):
    with pytest.raises(ValueError) as e:
        p.SamplingParams(**kwargs).validate(1000)
    assert field in str(e.value)
