"""Prometheus metrics and trace context against a real server (one server, a minute or two on CPU).

`--metrics-listen` serves GET /metrics with HTTP off; a few requests run through the SDK with a
traceparent each, on a KV cache small enough that some are preempted; the scrape (urllib, parsed
with prometheus_client's parser) shows the frontend's counters and histograms moved and the
scheduler's figures came through, and each request's trace id is on its events in both processes.
"""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess, free_port

from shared.client import AsyncClient, Client
from shared.protocol import SamplingParams

# 12 blocks of 16 tokens: six requests of about 45 tokens each (3 blocks) cannot all stay.
TIGHT = ("--num-kv-blocks", "12", "--block-size", "16", "--max-num-seqs", "8")
PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "The quick brown fox",
           "My favourite city is", "In 1969, the first"]
PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def traceparent(i: int) -> str:
    return f"00-{i + 1:032x}-{0xabc + i:016x}-01"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _run_all(address: str):
    async with AsyncClient(address) as client:
        return await asyncio.gather(*(client.generate(prompt, PARAMS, request_id=f"traced-{i}",
                                                      traceparent=traceparent(i))
                                      for i, prompt in enumerate(PROMPTS)))


@pytest.mark.slow
def test_metrics_endpoint_counts_requests_and_trace_ids_reach_every_event(tmp_path):
    port = free_port()
    srv = ServerProcess(str(tmp_path / "run"), *TIGHT, "--metrics-listen", f"127.0.0.1:{port}")
    try:
        srv.wait_for("frontend.metrics_listening", listen=f"127.0.0.1:{port}")
        before = scrape(port)
        assert before[("pagedserve:scheduler_reachable", ())] == 1
        assert before[("pagedserve:prompt_tokens_total", ())] == 0

        completions = asyncio.run(_run_all(srv.address))
        with Client(srv.address) as client:  # a malformed traceparent is ignored, never an error
            plain = client.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True), request_id="bad-trace",
                                    traceparent="00-not-a-trace")
        completions.append(plain)
        srv.wait_for("frontend.bad_traceparent", request_id="bad-trace")

        after = scrape(port)
        prompt_tokens = sum(c.prompt_tokens for c in completions)
        generated = sum(c.completion_tokens for c in completions)
        assert after[("pagedserve:prompt_tokens_total", ())] == prompt_tokens
        assert after[("pagedserve:generation_tokens_total", ())] == generated
        assert after[("pagedserve:request_success_total", (("finished_reason", "length"),))] == len(completions)
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                     "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens"):
            assert after[(f"pagedserve:{name}_count", ())] == len(completions), name
        assert after[("pagedserve:inter_token_latency_seconds_count", ())] == generated - len(completions)
        assert after[("pagedserve:request_generation_tokens_sum", ())] == generated
        preemptions = sum(after[("pagedserve:num_preemptions_total", (("mode", m),))] for m in ("recompute", "swap"))
        assert preemptions > 0 and preemptions == sum(c.num_preemptions for c in completions)
        assert after[("pagedserve:num_requests_running", ())] == after[("pagedserve:num_requests_waiting", ())] == 0
        assert 0.0 <= after[("pagedserve:kv_cache_usage_perc", ())] <= 1.0
        assert ("pagedserve:prefix_cache_queries_total", ()) in after

        trace_ids = {f"traced-{i}": traceparent(i)[3:35] for i in range(len(PROMPTS))}
        for rid, trace_id in trace_ids.items():
            assert srv.wait_for("request.finished", request_id=rid)["trace_id"] == trace_id
        assert "trace_id" not in srv.wait_for("request.finished", request_id="bad-trace")
        preempted = srv.named("request.preempted")
        assert preempted and all(e["trace_id"] == trace_ids[e["request_id"]] for e in preempted)
    finally:
        srv.stop()
