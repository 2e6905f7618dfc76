"""Routing affinity on the HTTP API: `session_key`, else OpenAI's `prompt_cache_key`, becomes
SamplingParams.session_key (the router's affinity key); an over-long key is refused by name."""

from __future__ import annotations

import msgspec
import pytest

from frontend.http.bodies import ChatBody, CompletionBody, decode_body
from frontend.http.errors import ApiError
from frontend.http.translate import chat_generate, completion_generate


def _completion(**body):
    return completion_generate(decode_body(msgspec.json.encode({"prompt": "hi", **body}), CompletionBody),
                               "cmpl-1", "m")


def _chat(**body):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    return chat_generate(decode_body(msgspec.json.encode(body), ChatBody), "chatcmpl-1", "m")


def test_session_key_and_prompt_cache_key_become_the_affinity_key():
    assert _completion(session_key="conv-7").params.session_key == "conv-7"
    assert _chat(prompt_cache_key="tenant-a").params.session_key == "tenant-a"
    assert _chat(session_key="ours", prompt_cache_key="theirs").params.session_key == "ours"
    assert _completion().params.session_key == "" and _chat(user="u1").params.session_key == ""


@pytest.mark.parametrize("field", ["session_key", "prompt_cache_key"])
def test_an_over_long_session_key_is_refused_by_name(field):
    with pytest.raises(ApiError) as caught:
        _chat(**{field: "k" * 257})
    assert (caught.value.status, caught.value.param) == (400, field) and "256 characters" in caught.value.message
    assert _chat(**{field: "k" * 256}).params.session_key == "k" * 256
