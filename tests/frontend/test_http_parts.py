"""The HTTP API's parts without sockets: body -> Generate, the refusals by name, API keys and the
loopback rule, /health's progress clock, the reply router."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from frontend.engine_status import EngineStatus
from frontend.http.auth import ApiKeys, HttpConfigError, keys_for
from frontend.http.bodies import IGNORED, ChatBody, CompletionBody, decode_body
from frontend.http.errors import ApiError
from frontend.http.health import HealthProbe
from frontend.http.replies import ReplyRouter, is_http_client
from frontend.http.translate import chat_generate, completion_generate
from shared import protocol as p
from shared.config import FrontendConfig
from shared.drain import Drain
from shared.structured import StructuredOutputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def completion(**body) -> p.Generate:
    return completion_generate(decode_body(msgspec_json(body), CompletionBody), "cmpl-1", "m")


def chat(**body) -> p.Generate:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return chat_generate(decode_body(msgspec_json(body), ChatBody), "chatcmpl-1", "m")


def msgspec_json(obj) -> bytes:
    import msgspec

    return msgspec.json.encode(obj)


def refused(make, **body) -> ApiError:
    with pytest.raises(ApiError) as e:
        make(**body)
    return e.value


def test_openai_and_vllm_fields_map_onto_sampling_params():
    msg = completion(prompt="hi", n=2, stop="x", seed=3, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1,
                     repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.3, ignore_eos=True,
                     min_tokens=2, stop_token_ids=[7], priority=-1, skip_special_tokens=False,
                     include_stop_str_in_output=True, logprobs=2, best_of=2, user="u", stream=True,
                     stream_options={"include_usage": True})
    assert msg.prompt == "hi" and msg.stream and msg.priority == -1
    assert msg.params == p.SamplingParams(n=2, max_tokens=16, stop=["x"], seed=3, temperature=0.5, top_p=0.9,
                                          top_k=5, min_p=0.1, repetition_penalty=1.1, presence_penalty=0.2,
                                          frequency_penalty=0.3, ignore_eos=True, min_tokens=2, stop_token_ids=[7],
                                          skip_special_tokens=False, include_stop_str_in_output=True, logprobs=2)
    assert completion(prompt=["hi"]).prompt == "hi"
    assert completion(prompt=[1, 2]).prompt_token_ids == [1, 2]
    assert completion(prompt=[[1, 2]]).prompt_token_ids == [1, 2]
    msg = chat(max_tokens=9, max_completion_tokens=4, logprobs=True, top_logprobs=3)
    assert msg.params.max_tokens == 4 and msg.params.logprobs == 3 and msg.params.temperature == 1.0
    assert chat().params.max_tokens is None and chat().params.logprobs is None  # up to max_model_len
    assert chat(logprobs=True).params.logprobs == 0


def test_fields_we_cannot_honour_are_refused_by_name():
    for make, body, param in [
            (completion, {"prompt": "x", "echo": True}, "echo"),
            (completion, {"prompt": "x", "suffix": "y"}, "suffix"),
            (completion, {"prompt": "x", "best_of": 3}, "best_of"),
            (completion, {"prompt": ["a", "b"]}, "prompt"),
            (completion, {"prompt": []}, "prompt"),
            (completion, {"prompt": [True]}, "prompt"),
            (completion, {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
            (completion, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
            (chat, {"response_format": {"type": "xml"}}, "response_format"),
            (chat, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
            (chat, {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
            (chat, {"tools": [{}]}, "tools"),
            (chat, {"tool_choice": "required"}, "tool_choice"),
            (chat, {"top_logprobs": 2}, "top_logprobs"),
            (chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
             "messages[0].content[0].type"),
            (chat, {"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]}, "messages[0].tool_calls"),
            (chat, {"frobnicate": 1}, "frobnicate"),
            (chat, {"n": "2"}, "n")]:
        e = refused(make, **body)
        assert (e.status, e.param) == (400, param), (body, e.message)
    e = refused(chat, model="gpt-4o")
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model")
    # What the openai SDK sends back when a previous reply's message is replayed is accepted.
    chat(messages=[{"role": "assistant", "content": "a", "refusal": None, "tool_calls": None, "audio": None,
                    "function_call": None, "annotations": []}], response_format={"type": "text"}, tool_choice="none",
         parallel_tool_calls=False, store=False, metadata={})


def test_structured_output_fields_map_to_one_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rf = chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    assert rf.params.structured_outputs == StructuredOutputs(json=schema)
    any_object = chat(response_format={"type": "json_object"}).params.structured_outputs
    assert any_object == StructuredOutputs(json_object=True)
    assert chat(response_format={"type": "text"}).params.structured_outputs is None
    vllm = completion(prompt="x", structured_outputs={"choice": ["a", "b"]})
    assert vllm.params.structured_outputs == StructuredOutputs(choice=["a", "b"])
    legacy = completion(prompt="x", guided_json=schema, guided_whitespace_pattern=" ?")
    assert legacy.params.structured_outputs == StructuredOutputs(json=schema, whitespace_pattern=" ?")
    assert completion(prompt="x", guided_regex="[0-9]+").params.structured_outputs.regex == "[0-9]+"


def test_docs_list_every_ignored_field():
    with open(os.path.join(ROOT, "docs", "http.md")) as f:
        docs = f.read()
    for name in IGNORED:
        assert f"`{name}`" in docs, name


def test_api_keys_and_the_loopback_rule(tmp_path):
    keys = ApiKeys(["a", "bb"])
    keys.check("Bearer bb")
    keys.check("bearer  a ")
    for header in (None, "", "Bearer", "Basic a", "Bearer b", "Bearer bbb"):
        with pytest.raises(ApiError) as e:
            keys.check(header)
        assert e.value.status == 401
    ApiKeys([]).check(None)  # no keys: open

    assert not keys_for(FrontendConfig(http_listen="127.0.0.1:8000")).required
    keys_for(FrontendConfig(http_listen="[::1]:8000"))
    keys_for(FrontendConfig(http_listen="localhost:8000"))
    with pytest.raises(HttpConfigError, match="--api-key-file.*--allow-unauthenticated-http"):
        keys_for(FrontendConfig(http_listen="0.0.0.0:8000"))
    keys_for(FrontendConfig(http_listen="0.0.0.0:8000", allow_unauthenticated_http=True))
    path = tmp_path / "keys"
    path.write_text("# only a comment\n\n")
    with pytest.raises(HttpConfigError, match="no key"):
        keys_for(FrontendConfig(http_listen="0.0.0.0:8000", api_key_file=str(path)))
    path.write_text("k1\n")
    assert keys_for(FrontendConfig(http_listen="0.0.0.0:8000", api_key_file=str(path))).required
    with pytest.raises(HttpConfigError, match="cannot read"):
        keys_for(FrontendConfig(http_listen="127.0.0.1:8000", api_key_file=str(tmp_path / "missing")))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_health_is_503_until_ready_while_draining_unreachable_degraded_or_stalled():
    async def main():
        status, drain, clock = EngineStatus("tcp://x"), Drain(timeout_s=1.0), Clock()
        stats = {"steps": 0, "requests_in_flight": 0, "workers_ready": 1}
        answer = {"hang": False}

        async def engine_stats(timeout):
            if answer["hang"]:
                await asyncio.sleep(10)
            return dict(stats)

        probe = HealthProbe(status, drain, engine_stats, stall_after_s=30.0, clock=clock)

        async def check():
            code, body = await probe.check()
            return code, body.status

        assert await check() == (503, "starting")
        info = p.EngineInfo(ready=True, model="m", max_model_len=64, vocab_size=10, block_size=4,
                            num_device_blocks=8, workers_ready=1, workers_expected=2, scheduler_id="s")
        status.update(info)
        stats["workers_ready"] = 1
        assert await check() == (503, "degraded")
        stats["workers_ready"] = 2
        assert await check() == (200, "ok")
        clock.now = 1000.0  # a quiet hour, then work: not a stall
        stats["requests_in_flight"] = 1
        assert await check() == (200, "ok")
        clock.now += 20
        assert await check() == (200, "ok")
        clock.now += 20  # 40 s of work and no step
        assert await check() == (503, "stalled")
        stats["steps"] = 1
        assert await check() == (200, "ok")
        status.update(p.EngineInfo(ready=False, scheduler_id="s2"))  # a restarted scheduler
        assert await check() == (503, "unavailable")
        status.update(info)
        answer["hang"] = True
        assert await check() == (503, "unavailable")
        drain.handle_signal()
        drain.poll()
        assert await check() == (503, "draining")
    asyncio.run(main())


def test_the_router_sends_http_replies_to_their_queue_and_drops_those_of_closed_ones():
    class Sockets:
        def __init__(self):
            self.sent = []

        async def send(self, client, msg):
            self.sent.append(client)

    async def main():
        sockets = Sockets()
        router = ReplyRouter(sockets)
        client, queue = router.open()
        other, _ = router.open()
        assert is_http_client(client) and client != other and not is_http_client(b"\x00\x01\x02\x03\x04")
        await router.send(client, p.KeepAlive())
        await router.reply_error(client, "r", "overloaded", "full")
        assert isinstance(queue.get_nowait(), p.KeepAlive) and queue.get_nowait().code == "overloaded"
        router.close(client)
        await router.send(client, p.KeepAlive())  # gone: dropped
        await router.send(b"zmq", p.KeepAlive())
        assert queue.empty() and sockets.sent == [b"zmq"]
        assert ReplyRouter.socket_clients([client, b"zmq"]) == [b"zmq"]
    asyncio.run(main())


def test_a_non_loopback_listener_without_keys_stops_the_frontend_before_it_loads_anything(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launcher", "frontend", "--http-listen", "0.0.0.0:8001",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=False)
    assert out.returncode == 2 and "--api-key-file" in out.stderr and "--allow-unauthenticated-http" in out.stderr
