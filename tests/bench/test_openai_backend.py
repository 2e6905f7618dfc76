"""`pagedserve bench ... --backend openai` against a fake OpenAI-compatible server on 127.0.0.1
(tests/bench/fake_openai_server.py): the requests sent, the records kept, failures and goodput.
No model is loaded; timings are checked for order only, never for speed."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

pytest.importorskip("aiohttp")

from bench import openai_driver  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.workload import BenchRequest  # noqa: E402
from fake_openai_server import MODEL, FakeOpenAIServer  # noqa: E402

TINY = ["--num-prompts", "6", "--dataset", "synthetic", "--max-output-len", "6", "--no-plots"]


def _bench(tmp_path, server: FakeOpenAIServer, mode: str, *args: str) -> tuple[int, dict]:
    code = main([mode, "--backend", "openai", "--base-url", server.base_url, *TINY, *args,
                 "--out", str(tmp_path), "--tag", "t"])
    return code, json.loads((tmp_path / "t.json").read_text())


def test_driver_records_every_token_of_a_vllm_style_stream():
    requests = [BenchRequest([5, 6, 7], 1), BenchRequest([8] * 20, 4), BenchRequest(list(range(1, 40)), 9)]
    with FakeOpenAIServer(api_key="sk-test") as server:
        records, duration, figures = asyncio.run(openai_driver.run_requests(
            server.base_url + "/v1/", MODEL, requests, api_key="sk-test"))  # the /v1 form works too
    assert figures == {} and duration > 0
    for request, record in zip(requests, records):
        assert record.ok, record.error
        assert record.prompt_len == len(request.prompt_ids)
        # The count is the usage chunk's; a chunk carrying two tokens' text is timed once.
        assert record.num_output_tokens == request.output_len
        assert len(record.token_times_s) == (request.output_len - 1 if request.output_len >= 4 else request.output_len)
        assert record.token_times_s == sorted(record.token_times_s)
        assert 0 <= record.sent_s < record.token_times_s[0]
        assert 0 < record.ttft_s <= record.e2e_s < duration
    assert records[0].tpot_s() is None and records[2].tpot_s() > 0
    bodies = {tuple(b["prompt"]): b for b in server.bodies}
    for request in requests:
        body = bodies[tuple(request.prompt_ids)]
        assert body["max_tokens"] == request.output_len and body["temperature"] == 0
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    assert set(server.auth) == {"Bearer sk-test"}


def test_serve_sweep_with_goodput_everything_meets(tmp_path, capsys):
    with FakeOpenAIServer(api_key="sk-test") as server:
        code, result = _bench(tmp_path, server, "serve", "--request-rate", "100", "inf", "--api-key", "sk-test",
                              "--goodput", "ttft:60000", "tpot:60000", "e2el:60000")
    assert code == 0
    # No --model: the first model of /v1/models, and its owner names the engine.
    assert result["backend"] == "openai" and result["base_url"] == server.base_url and result["model"] == MODEL
    assert result["server_models"]["data"][0]["owned_by"] == "fakellm"
    assert "dtype" not in result and list(result["rates"]) == ["100", "inf"]
    # Each run: a warm-up of 4 tokens, then the 6 requests, 4 to 6 tokens each.
    bench_bodies = server.bodies[1:7] + server.bodies[8:]
    assert len(server.bodies) == 14 and [b["max_tokens"] for b in server.bodies[::7]] == [4, 4]
    for run in result["rates"].values():
        assert run["num_requests"] == run["completed"] == 6 and run["failed"] == 0 and run["errors"] == []
        assert run["output_tokens"] == sum(b["max_tokens"] for b in bench_bodies) // 2
        assert 24 <= run["output_tokens"] <= 36
        assert run["ttft_ms"]["median"] <= run["e2e_ms"]["median"] and run["tpot_ms"]["mean"] > 0
        assert "kv_usage_peak" not in run
        assert run["goodput"] == {"slo_ms": {"ttft": 60000.0, "tpot": 60000.0, "e2el": 60000.0},
                                  "good_requests": 6, "requests_per_s": run["requests_per_s"]}
    out = capsys.readouterr().out
    assert "good req/s" in out and "ttft <= 60000 ms and tpot <= 60000 ms" in out


def test_goodput_when_no_request_meets_the_slo(tmp_path):
    with FakeOpenAIServer() as server:
        # The fake spaces its chunks 3 ms apart: no request has a TPOT of 1 ms or less.
        code, result = _bench(tmp_path, server, "serve", "--model", MODEL, "--request-rate", "inf",
                              "--goodput", "ttft:60000", "tpot:1")
    assert code == 0
    run = result["rates"]["inf"]
    assert run["completed"] == 6 and run["goodput"]["good_requests"] == 0 and run["goodput"]["requests_per_s"] == 0


def test_failed_requests_are_counted_not_fatal(tmp_path, capsys):
    with FakeOpenAIServer(faulty=True) as server:
        code, result = _bench(tmp_path, server, "throughput", "--model", MODEL, "--num-prompts", "7",
                              "--goodput", "ttft:60000")
    assert code == 0
    assert list(result["engines"]) == ["fakellm via HTTP"] and result["ratios"] == {}
    run = result["engines"]["fakellm via HTTP"]
    assert run["num_requests"] == 7 and run["completed"] == 3 and run["failed"] == 4
    errors = " | ".join(e["error"] for e in run["errors"])
    assert "HTTP 400: prompt is too long for this fake" in errors
    assert "error in the stream: out of KV blocks" in errors
    assert "cut short" in errors and "does it honour ignore_eos?" in errors
    assert {e["count"] for e in run["errors"]} == {1}
    completed = [b["max_tokens"] for b in server.bodies[5:]]  # after the warm-up and the 4 failures
    assert run["output_tokens"] == sum(completed) and len(completed) == 3
    assert run["goodput"]["good_requests"] == 3  # a failed request is never good
    assert "4 of 7 requests failed" in capsys.readouterr().err


def test_unreachable_server_fails_at_the_warm_up(tmp_path):
    with socket.socket() as s:  # a free port on loopback with nothing listening once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--model", "m",
              *TINY, "--out", str(tmp_path)])
    assert "warm-up request" in str(exc.value.code) and f"127.0.0.1:{port}" in str(exc.value.code)


@pytest.mark.parametrize("args", [
    ["serve", "--backend", "openai"],  # no --base-url
    ["serve", "--backend", "openai", "--base-url", "127.0.0.1:8000"],  # no scheme
    ["serve", "--base-url", "http://127.0.0.1:8000"],  # zmq has no base URL
    ["throughput", "--backend", "openai", "--base-url", "http://127.0.0.1:8000", "--peers", "cb"],
    ["serve", "--backend", "openai", "--base-url", "http://127.0.0.1:8000", "--server", "tcp://127.0.0.1:1"],
    ["serve", "--goodput", "ttfb:500"],
    ["serve", "--goodput", "ttft:fast"],
])
def test_flags_of_the_other_backend_are_refused(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
