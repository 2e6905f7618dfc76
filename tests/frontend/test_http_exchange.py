"""The HTTP API end to end on loopback, the scheduler played by the test (tests/frontend/http_harness.py):
OpenAI's response shapes, SSE framing, error statuses, keys, and aborts on disconnect."""

from __future__ import annotations

import asyncio
import json

import pytest
from http_harness import KEY, Harness

from shared import protocol as p


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\nother-key\n{KEY}\n")
    return str(path)


def test_a_completion_and_a_chat_have_openai_shapes_and_usage():
    async def main():
        async with Harness() as h:
            call = asyncio.create_task(h.http("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 5}))
            add = await h.next_added()
            assert add.prompt_token_ids == [ord("h") % 100, ord("i") % 100] and add.params.max_tokens == 5
            await h.tokens(add.request_id, "abc", finish="length")
            reply = await call
            assert reply.status == 200 and reply.headers["content-type"] == "application/json"
            body = reply.json()
            assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "m"
            assert body["choices"] == [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length"}]
            assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}

            call = asyncio.create_task(h.http("POST", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                "max_completion_tokens": 4, "stop": "zz", "user": "ignored", "logit_bias": {}}))
            add = await h.next_added()
            assert add.prompt_token_ids == [ord(c) % 100 for c in "a\nb"] and add.params.stop == ["zz"]
            assert add.params.max_tokens == 4
            await h.tokens(add.request_id, "ok", finish="stop")
            body = (await call).json()
            assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
            assert body["choices"] == [{"index": 0, "message": {"content": "ok", "role": "assistant", "refusal": None},
                                        "logprobs": None, "finish_reason": "stop"}]
    run(main())


def test_a_stream_is_sse_chunks_then_usage_then_done():
    async def main():
        async with Harness() as h:
            call = asyncio.create_task(h.http("POST", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "x"}], "stream": True, "n": 2,
                "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1}))
            add = await h.next_added()
            lp = [p.TokenLogprobs(token_id=ord("a"), logprob=-0.5, rank=1, top_ids=[ord("a")], top_logprobs=[-0.5])]
            await h.tokens(add.request_id, "a", index=0, logprobs=lp)
            await h.tokens(add.request_id, "a", index=1, logprobs=lp)
            await h.tokens(add.request_id, "a", index=0, finish="length", logprobs=lp)
            await h.tokens(add.request_id, "a", index=1, finish="length", logprobs=lp)
            reply = await call
            assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
            events = reply.events()
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
            assert [c["choices"][0]["delta"] for c in chunks[:4]] == [
                {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "a"},
                {"content": "a"}, {"content": "a"}]
            assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, "length", "length"]
            assert chunks[0]["choices"][0]["logprobs"] == {"content": [{"token": "a", "logprob": -0.5, "bytes": [97],
                                                           "top_logprobs": [{"token": "a", "logprob": -0.5,
                                                                             "bytes": [97]}]}], "refusal": None}
            assert all(c["usage"] is None for c in chunks[:4])
            assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {"prompt_tokens": 1, "completion_tokens": 4,
                                                                         "total_tokens": 5}
    run(main())


def test_completion_logprobs_have_tokens_offsets_and_the_chosen_token_among_the_top():
    async def main():
        async with Harness() as h:
            call = asyncio.create_task(h.http("POST", "/v1/completions", {"prompt": [5, 6], "logprobs": 1, "stream": True}))
            add = await h.next_added()
            assert add.prompt_token_ids == [5, 6] and add.params.logprobs == 1
            lp = [p.TokenLogprobs(token_id=ord(c), logprob=-1.0, rank=2, top_ids=[ord("z")], top_logprobs=[-0.1])
                  for c in "ab"]
            await h.tokens(add.request_id, "ab", logprobs=lp)
            await h.tokens(add.request_id, "c", finish="stop", logprobs=[p.TokenLogprobs(
                token_id=ord("c"), logprob=-2.0, rank=1, top_ids=[ord("c")], top_logprobs=[-2.0])])
            chunks = [json.loads(e) for e in (await call).events()[:-1]]
            first, second = (c["choices"][0]["logprobs"] for c in chunks)
            assert first == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -1.0], "text_offset": [0, 1],
                             "top_logprobs": [{"z": -0.1, "a": -1.0}, {"z": -0.1, "b": -1.0}]}
            assert second["text_offset"] == [2] and "usage" not in chunks[0]
    run(main())


def test_errors_are_openai_error_objects_with_fitting_statuses(key_file):
    async def main():
        async with Harness(api_key_file=key_file) as h:
            async def error(path, body, status, key=KEY, method="POST"):
                reply = await h.http(method, path, body, key=key)
                assert reply.status == status, reply.body
                detail = reply.json()["error"]
                assert set(detail) == {"message", "type", "param", "code"}
                return reply, detail

            _, d = await error("/v1/completions", {"prompt": "x"}, 401, key=None)
            assert d["code"] == "invalid_api_key"
            await error("/v1/models", None, 401, key="wrong", method="GET")
            _, d = await error("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400)
            assert d["param"] == "temperature"
            _, d = await error("/v1/completions", {"prompt": "x", "echo": True}, 400)
            assert d["param"] == "echo"
            _, d = await error("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "tools": [{"type": "function"}]}, 400)
            assert d["param"] == "tools"
            _, d = await error("/v1/completions", {"prompt": "x", "top_p": 0}, 400)
            assert d["param"] == "top_p" and "top_p" in d["message"]
            _, d = await error("/v1/completions", {"prompt": "x" * 60, "max_tokens": 10}, 400)
            assert d["code"] == "context_length_exceeded"
            _, d = await error("/v1/completions", b"{nope", 400)
            _, d = await error("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404)
            assert d["code"] == "model_not_found" and d["param"] == "model"
            await error("/v1/nothing", {}, 404)
            await error("/v1/completions", None, 405, method="GET")

            call = asyncio.create_task(h.http("POST", "/v1/completions", {"prompt": "x", "stream": True}))
            add = await h.next_added()
            await h.deliver(p.RequestRejected(request_id=add.request_id, code="overloaded", message="full"))
            reply = await call
            assert reply.status == 429 and reply.headers["retry-after"] == "1"
            assert reply.json()["error"]["type"] == "rate_limit_error"

            assert (await h.http("GET", "/v1/models", key=KEY)).json()["data"][0]["max_model_len"] == 64
            h.drain.handle_signal()
            h.drain.poll()
            _, d = await error("/v1/completions", {"prompt": "x"}, 503)
            assert d["code"] == "shutting_down"
            assert (await h.http("GET", "/health", key=None)).status == 503
    run(main())


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_aborts_its_request(stream):
    async def main():
        async with Harness() as h:
            reader, writer = await h.open("POST", "/v1/completions", {"prompt": "x", "stream": stream})
            add = await h.next_added()
            if stream:
                await h.tokens(add.request_id, "a")
                assert b"data: " in await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
            writer.close()
            for _ in range(100):
                if h.engine.aborted:
                    break
                await asyncio.sleep(0.02)
            assert h.engine.aborted == [add.request_id]
            await h.deliver(p.EngineOutputs(deltas=[p.TokenDelta(request_id=add.request_id, index=0, token_ids=[],
                                                                 finish_reason="abort")]))
            assert len(h.server.table) == 0 and len(h.server.replies) == 0
    run(main())
