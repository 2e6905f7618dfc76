"""vLLM's beam-search extra body fields on the HTTP API map onto SamplingParams: best_of is the
beam width on /v1/completions, temperature defaults to 0, and incompatible fields are still named."""

from __future__ import annotations

import msgspec
import pytest

from frontend.http.bodies import ChatBody, CompletionBody, decode_body
from frontend.http.translate import chat_generate, completion_generate


def _completion(**body):
    return completion_generate(decode_body(msgspec.json.encode(body), CompletionBody), "cmpl-1", "m")


def _chat(**body):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    return chat_generate(decode_body(msgspec.json.encode(body), ChatBody), "chatcmpl-1", "m")


def test_beam_fields_map_onto_sampling_params():
    params = _completion(prompt="hi", n=2, best_of=4, use_beam_search=True, length_penalty=0.5,
                         early_stopping="never").params
    assert (params.use_beam_search, params.beam_width, params.n, params.temperature) == (True, 4, 2, 0.0)
    assert (params.length_penalty, params.early_stopping) == (0.5, "never")
    params.validate(1000)
    chat = _chat(n=3, use_beam_search=True, early_stopping=True).params
    assert chat.use_beam_search and chat.beam_width == 3 and chat.early_stopping is True and chat.temperature == 0.0
    assert _completion(prompt="hi").params.use_beam_search is False


def test_an_explicit_temperature_is_kept_and_refused_by_validation():
    params = _completion(prompt="hi", use_beam_search=True, temperature=0.8).params
    assert params.temperature == 0.8
    with pytest.raises(ValueError, match="temperature 0"):
        params.validate(1000)
