"""The real processes, the real default model, the client SDK, on loopback."""

from __future__ import annotations

import asyncio

import pytest
import zmq
from server_process import ServerProcess

from shared.client import AsyncClient, Client, RequestError
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three uses of a paperclip:",
    "The capital of Japan is",
    "Explain why the sky is blue in one sentence.",
    "Translate 'good morning' into French:",
    "A recipe for pancakes begins with",
    "The largest planet in our solar system",
    "Q: What is 12 times 12?\nA:",
    "In 1969, humans first",
    "My favourite programming language is",
    "Photosynthesis is the process by which",
    "Here is a short poem about autumn:\n",
    "The quick brown fox",
]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


async def _stream_all(address: str, prompts: list[str], params: SamplingParams):
    """Every prompt as a concurrent stream; returns (completion, streamed token ids, streamed text) each."""
    async with AsyncClient(address) as client:
        async def one(prompt):
            stream = client.stream(prompt, params)
            ids, text = [], ""
            async for delta in stream:
                ids += delta.token_ids
                text += delta.text
            return stream.completion, ids, text

        return await asyncio.gather(*(one(pr) for pr in prompts))


def _check_against_transformers(results, greedy):
    for completion, streamed_ids, streamed_text in results:
        assert streamed_ids == completion.token_ids
        assert streamed_text == completion.text
        expected = greedy(completion.prompt_token_ids, 32)
        assert completion.token_ids == expected, completion.prompt_token_ids
        assert completion.finish_reason == ("stop" if len(expected) < 32 else "length")


def test_capital_of_france(server):
    with Client(server.address) as c:
        out = c.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY)
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
    assert out.completion_tokens == len(out.token_ids) and out.prompt_tokens == len(out.prompt_token_ids)


def test_sixteen_concurrent_streams_equal_transformers(server, hf_reference):
    _, greedy = hf_reference
    results = asyncio.run(_stream_all(server.address, PROMPTS, GREEDY))
    _check_against_transformers(results, greedy)
    finished = {e["request_id"] for e in server.named("request.finished")}
    assert {r[0].request_id for r in results} <= finished


def test_forced_preemption_gives_the_same_tokens(tmp_path, hf_reference):
    _, greedy = hf_reference
    # 24 blocks of 16 tokens hold ~5 of these sequences at once: 16 streams must preempt.
    srv = ServerProcess(str(tmp_path / "run"), "--num-kv-blocks", "24", "--block-size", "16")
    try:
        results = asyncio.run(_stream_all(srv.address, PROMPTS, GREEDY))
        preempted = srv.named("request.preempted")
        with Client(srv.address) as c:
            stats = c.stats()
    finally:
        assert srv.stop() == 0
    assert preempted, "the small cache should have forced preemption"
    assert all(e["mode"] == "recompute" for e in preempted)
    assert stats["kv_blocks_total"] == 24
    assert sum(r[0].num_preemptions for r in results) > 0
    _check_against_transformers(results, greedy)
    assert not srv.non_json_lines


def test_bad_requests_get_typed_errors_and_the_server_goes_on(server):
    with Client(server.address) as c:
        with pytest.raises(RequestError) as e:
            c.generate("hello", SamplingParams(max_tokens=-1))
        assert e.value.code == "invalid_request" and "max_tokens" in e.value.message
        with pytest.raises(RequestError) as e:
            c.generate("hello " * 9000, GREEDY)
        assert e.value.code == "too_long"
        with pytest.raises(RequestError) as e:
            c.generate(prompt_token_ids=[1, 2, 10**9], params=GREEDY)
        assert e.value.code == "invalid_request" and "vocabulary" in e.value.message
        with pytest.raises(RequestError) as e:
            c.generate(prompt_token_ids=[], params=GREEDY)
        assert e.value.code == "invalid_request"
        with pytest.raises(RequestError) as e:
            c.generate("hi", SamplingParams(max_tokens=4, top_p=0.0))
        assert e.value.code == "invalid_request" and "top_p" in e.value.message

    # Garbage on the socket: that client gets an error, nobody else notices.
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(server.address)
    raw.send(b"\xc1not msgpack")
    assert raw.poll(10_000)
    assert b"invalid_request" in raw.recv()
    raw.close(0)
    ctx.term()

    with Client(server.address) as c:
        assert c.health()["status"] == "ok"
        out = c.generate(prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=4, temperature=0.0))
        assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_abort_and_stop_strings(server):
    with Client(server.address) as c:
        stream = c.stream("Once upon a time", SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        got = []
        for d in stream:
            got.append(d)
            if len(got) == 3:
                c.abort(d.request_id)
        assert stream.completion.finish_reason == "abort"
        assert len(stream.completion.token_ids) < 200

        full = c.generate("Once upon a time", SamplingParams(max_tokens=32, temperature=0.0))
        word = full.text.split()[3]
        cut = c.generate("Once upon a time", SamplingParams(max_tokens=32, temperature=0.0, stop=[word]))
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(word)]
        stats = c.stats()
    assert stats["kv_blocks_used"] == 0


def test_sampling_with_seed_is_reproducible(server):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    with Client(server.address) as c:
        a = c.generate("Tell me a story", params)
        b = c.generate("Tell me a story", params)
        n = c.generate("Tell me a story", SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7))
    assert a.token_ids == b.token_ids
    assert len(n.outputs) == 3 and [o.index for o in n.outputs] == [0, 1, 2]


def test_roles_started_separately_serve_together(tmp_path):
    srv = ServerProcess(str(tmp_path / "run"), separate_roles=True)
    try:
        with Client(srv.address) as c:
            out = c.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY)
    finally:
        srv.stop()
    assert out.text == "The capital of France is Paris."
    assert {e["role"] for e in srv.events} == {"scheduler", "worker", "frontend"}
