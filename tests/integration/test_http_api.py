"""The OpenAI-compatible HTTP API (docs/http.md) through the official `openai` client (sync, async,
streaming) and curl, against one real server on loopback that also serves the ZeroMQ SDK: the
same answers on both paths, every error status from a real bad request, disconnects freeing
blocks, and 503 while draining (last: it stops the server)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai.types import Completion
from server_process import ServerProcess, free_port

from shared.client import Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

KEY = "sk-pagedserve-test"
MODEL = "smol"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    keys = run_dir / "api_keys"
    keys.write_text(f"another-key\n{KEY}\n")
    port = free_port()
    # --max-waiting 2: a burst of requests gets 429 (the tests below send one request at a time).
    server = ServerProcess(str(run_dir), "--http-listen", f"127.0.0.1:{port}", "--api-key-file", str(keys),
                           "--served-model-name", MODEL, "--max-waiting", "2")
    server.base_url = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


def api(srv, key: str = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0, **kw)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_idle(srv, timeout_s: float = 30.0) -> dict:
    """The scheduler's stats once nothing is in flight and no KV block is in use."""
    deadline = time.monotonic() + timeout_s
    with Client(srv.address) as c:
        while True:
            stats = c.stats()
            if stats["requests_in_flight"] == 0 and stats["kv_blocks_used"] == 0:
                return stats
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)


def test_models_health_and_http_listening(srv):
    event = srv.wait_for("http.listening")
    assert event["address"] == srv.base_url.removeprefix("http://") and event["auth"] is True
    models = api(srv).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "pagedserve"
    assert models.data[0].model_extra["max_model_len"] > 0
    assert get(srv.base_url + "/health") == (200, {"status": "ok"})


def test_greedy_chat_and_completion_equal_the_sdk_path_with_usage(srv):
    client = api(srv)
    with Client(srv.address) as sdk:
        want_chat = sdk.chat(CHAT, SamplingParams(max_tokens=24, temperature=0.0))
        want_text = sdk.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.0))
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == want_chat.text and chat.choices[0].finish_reason == want_chat.finish_reason
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (want_chat.prompt_tokens,
                                                                        want_chat.completion_tokens)
    assert chat.usage.total_tokens == want_chat.prompt_tokens + want_chat.completion_tokens
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert text.choices[0].text == want_text.text and text.usage.completion_tokens == want_text.completion_tokens
    by_ids = client.completions.create(model=MODEL, prompt=want_text.prompt_token_ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == want_text.text

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat.text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == want_chat.completion_tokens


def test_async_n2_with_a_seed_reproduces_and_stop_strings_end_like_the_sdk(srv):
    async def sample():
        async with openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0) as client:
            out = await client.completions.create(model=MODEL, prompt="Once upon a time", n=2, seed=7,
                                                  temperature=1.0, max_tokens=16)
            return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first, second = asyncio.run(sample()), asyncio.run(sample())
    assert first == second and len(first) == 2

    with Client(srv.address) as sdk:
        full = sdk.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.0)).text
        stop = full.split()[1]  # a word the greedy answer contains
        want = sdk.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.0, stop=[stop]))
    got = api(srv).completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop)
    assert got.choices[0].text == want.text and stop not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop" == want.finish_reason


def test_logprobs_equal_the_sdk_path(srv):
    client = api(srv)
    with Client(srv.address) as sdk:
        want = sdk.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3)).outputs[0].logprobs
        want_chat = sdk.chat(CHAT, SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)).outputs[0].logprobs
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == [e.logprob for e in want]
    assert [sorted(t.values(), reverse=True)[:3] for t in lp.top_logprobs] == [e.top_logprobs for e in want]
    assert lp.text_offset[0] == 0 and len(lp.tokens) == len(want)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == [e.logprob for e in want_chat]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [e.top_logprobs for e in want_chat]
    assert all(bytes(c.bytes).decode() == c.token for c in content)


def test_structured_output_through_the_openai_client(srv):
    client = api(srv)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Spain"]}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
    place = json.loads(reply.choices[0].message.content)
    assert set(place) == {"city", "country"} and place["country"] in ("France", "Spain")
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5,
                                       extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert choice.choices[0].text in ("red", "blue") and choice.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"guided_regex": "[a-"})
    assert e.value.body["code"] == "invalid_request" and "regex" in e.value.body["message"]


def test_every_error_status_from_a_real_bad_request(srv):
    client = api(srv)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert e.value.body["param"] == "temperature" and e.value.body["code"] == "invalid_request"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "json_schema"})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1_000_000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        api(srv, key="sk-wrong").models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"

    async def burst():
        async with openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*[aclient.completions.create(model=MODEL, prompt=f"{i} {PROMPT}",
                                                                     max_tokens=4) for i in range(16)],
                                        return_exceptions=True)

    # A long stream keeps the scheduler stepping, so a burst finds max_waiting (2) sequences waiting.
    with client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True,
                                   extra_body={"ignore_eos": True}) as long:
        next(iter(long))
        for _ in range(3):
            results = asyncio.run(burst())
            limited = [r for r in results if isinstance(r, openai.RateLimitError)]
            if limited:
                break
    assert limited and all(isinstance(r, (openai.RateLimitError, Completion)) for r in results), results
    assert limited[0].response.headers["retry-after"] == "1" and limited[0].body["code"] == "overloaded"
    wait_idle(srv)


def test_a_client_that_disconnects_frees_its_blocks(srv):
    client = api(srv)
    with Client(srv.address) as sdk:
        finished = sdk.stats()["requests_finished"]
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=500, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()  # mid-stream
    with pytest.raises(openai.APITimeoutError):  # gives up waiting for a whole answer
        api(srv, timeout=1.0).completions.create(model=MODEL, prompt=PROMPT, max_tokens=500,
                                                 extra_body={"ignore_eos": True})
    stats = wait_idle(srv)
    assert stats["requests_aborted"] >= 2 and stats["requests_finished"] >= finished
    aborted = [e for e in srv.named("request.finished") if e["finish_reason"] == "abort"]
    assert len(aborted) >= 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_shows_the_raw_sse_framing(srv):
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", srv.base_url + "/v1/completions", "-H", f"Authorization: Bearer {KEY}",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", out
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_of_metrics_parses_and_counters_move_as_requests_run(srv):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        text = subprocess.run(["curl", "-sS", srv.base_url + "/metrics"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
        return {sample.name: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.labels.get("model_name") == MODEL}

    before = scrape()
    api(srv).completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.0,
                                extra_body={"ignore_eos": True})
    after = scrape()
    assert after["pagedserve:generation_tokens_total"] - before.get("pagedserve:generation_tokens_total", 0) == 5
    assert after["pagedserve:e2e_request_latency_seconds_count"] == (
        before.get("pagedserve:e2e_request_latency_seconds_count", 0) + 1)
    assert after["pagedserve:prompt_tokens_total"] > before.get("pagedserve:prompt_tokens_total", 0)
    assert "pagedserve:kv_cache_usage_perc" in after and "pagedserve:num_requests_running" in after


def test_503_while_draining(srv):
    """Last: SIGTERM drains the server (the frontend first) while a stream runs."""
    client = api(srv)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    os.kill(srv.procs[0].pid, signal.SIGTERM)
    srv.wait_for("frontend.draining", timeout_s=30)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 503 and e.value.body["code"] == "shutting_down"
    assert get(srv.base_url + "/health")[0] == 503
    next(chunks)  # the stream in flight goes on meanwhile
    stream.close()
    srv.wait_for("frontend.stopped", timeout_s=30)
