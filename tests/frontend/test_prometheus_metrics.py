"""Prometheus metrics (frontend/metrics.py) and the stand-alone /metrics endpoint
(frontend/metrics_endpoint.py): no scheduler, no model. Each exposition is parsed with
prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from metrics_fakes import MODEL, FakeClients, FakeEngine, fake_stats, make_request, render, run_request, value
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from frontend.metrics import FrontendMetrics, token_buckets
from frontend.metrics_endpoint import serve_metrics
from frontend.requests import RequestTable
from frontend.streams import ResponseStreamer
from shared import protocol as p

SCHEDULER_STATS = {"running": 3, "waiting": 2, "swapped": 1, "kv_blocks_used": 25, "kv_blocks_total": 100,
                   "prefix_cache_queried_tokens": 640, "prefix_cache_hit_tokens": 160, "preemptions": 5,
                   "preemptions_recompute": 4, "preemptions_swap": 1, "tokens_generated": 99}


def test_every_metric_is_exposed_with_the_scheduler_figures():
    metrics = FrontendMetrics(MODEL, fake_stats(SCHEDULER_STATS))
    text = render(metrics)
    names = {f.name for f in text_string_to_metric_families(text)}
    expected = {"num_requests_running", "num_requests_waiting", "num_requests_swapped", "kv_cache_usage_perc",
                "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens",
                "generation_tokens", "request_success", "time_to_first_token_seconds",
                "inter_token_latency_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                "request_generation_tokens", "scheduler_reachable"}
    assert {"pagedserve:" + n for n in expected} <= names
    assert value(text, "pagedserve:num_requests_running") == 3
    assert value(text, "pagedserve:num_requests_waiting") == 2
    assert value(text, "pagedserve:num_requests_swapped") == 1
    assert value(text, "pagedserve:kv_cache_usage_perc") == 0.25
    assert value(text, "pagedserve:prefix_cache_queries_total") == 640
    assert value(text, "pagedserve:prefix_cache_hits_total") == 160
    assert value(text, "pagedserve:num_preemptions_total", mode="recompute") == 4
    assert value(text, "pagedserve:num_preemptions_total", mode="swap") == 1
    assert value(text, "pagedserve:scheduler_reachable") == 1
    for reason in ("stop", "length", "abort", "error"):
        assert value(text, "pagedserve:request_success_total", finished_reason=reason) == 0


def test_scheduler_totals_are_counters_and_follow_each_scrape():
    stats = dict(SCHEDULER_STATS)

    async def current():
        return dict(stats)

    metrics = FrontendMetrics(MODEL, current)
    kinds = {f.name: f.type for f in text_string_to_metric_families(render(metrics))}
    assert kinds["pagedserve:prefix_cache_hits"] == kinds["pagedserve:num_preemptions"] == "counter"
    assert kinds["pagedserve:num_requests_running"] == kinds["pagedserve:kv_cache_usage_perc"] == "gauge"
    stats.update(prefix_cache_hit_tokens=200, preemptions_swap=3, running=0)
    text = render(metrics)
    assert value(text, "pagedserve:prefix_cache_hits_total") == 200
    assert value(text, "pagedserve:num_preemptions_total", mode="swap") == 3
    assert value(text, "pagedserve:num_requests_running") == 0
    stats.update(prefix_cache_hit_tokens=0)  # a restarted scheduler: Prometheus sees a counter reset
    assert value(render(metrics), "pagedserve:prefix_cache_hits_total") == 0


@pytest.mark.parametrize("failure", ["raises", "hangs"])
def test_a_silent_scheduler_leaves_its_metrics_out_and_the_scrape_fast(failure):
    async def stats():
        if failure == "raises":
            raise TimeoutError
        await asyncio.sleep(60)

    metrics = FrontendMetrics(MODEL, stats, stats_timeout_s=0.05)
    text = render(metrics)
    assert value(text, "pagedserve:scheduler_reachable") == 0
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "pagedserve:num_requests_running" not in names and "pagedserve:prompt_tokens" in names


def test_counters_and_histograms_move_as_requests_finish():
    metrics = FrontendMetrics(MODEL, fake_stats(SCHEDULER_STATS))
    table = RequestTable()
    streamer = ResponseStreamer(table, FakeClients(), FakeEngine(), observer=metrics)
    run_request(streamer, table, make_request("a", prompt_len=5), tokens=4, finish="length")
    run_request(streamer, table, make_request("b", prompt_len=3), tokens=2, finish="stop")
    text = render(metrics)
    assert value(text, "pagedserve:prompt_tokens_total") == 8
    assert value(text, "pagedserve:generation_tokens_total") == 6
    assert value(text, "pagedserve:request_success_total", finished_reason="length") == 1
    assert value(text, "pagedserve:request_success_total", finished_reason="stop") == 1
    count = lambda name: value(text, f"pagedserve:{name}_count")  # noqa: E731
    assert count("time_to_first_token_seconds") == 2
    assert count("inter_token_latency_seconds") == 3 + 1  # gaps between tokens of one output
    assert count("e2e_request_latency_seconds") == count("request_decode_time_seconds") == 2
    assert count("request_queue_time_seconds") == count("request_prefill_time_seconds") == 2
    assert value(text, "pagedserve:request_queue_time_seconds_sum") == 1.0
    assert value(text, "pagedserve:request_prefill_time_seconds_sum") == 0.5
    assert value(text, "pagedserve:request_prompt_tokens_sum") == 8
    assert value(text, "pagedserve:request_generation_tokens_sum") == 6
    assert value(text, "pagedserve:request_generation_tokens_bucket", le="5.0") == 2
    assert streamer.finished == 2


def test_an_abort_before_the_first_token_counts_but_has_no_token_times():
    metrics = FrontendMetrics(MODEL, fake_stats({}))
    table = RequestTable()
    streamer = ResponseStreamer(table, FakeClients(), FakeEngine(), observer=metrics)
    req = make_request("gone")
    table.add(req)
    asyncio.run(streamer.abort(req))
    text = render(metrics)
    assert value(text, "pagedserve:request_success_total", finished_reason="abort") == 1
    assert value(text, "pagedserve:e2e_request_latency_seconds_count") == 1
    assert value(text, "pagedserve:time_to_first_token_seconds_count") == 0
    assert value(text, "pagedserve:request_decode_time_seconds_count") == 0


def test_n_outputs_time_their_tokens_each():
    metrics = FrontendMetrics(MODEL, fake_stats({}))
    table = RequestTable()
    streamer = ResponseStreamer(table, FakeClients(), FakeEngine(), observer=metrics)
    req = make_request("n2", n=2)
    table.add(req)

    async def go():
        for index in (0, 1, 0, 1):
            await streamer.on_delta(p.TokenDelta("n2", index, [3]))
        for index in (0, 1):
            await streamer.on_delta(p.TokenDelta("n2", index, [4], "length"))
    asyncio.run(go())
    text = render(metrics)
    assert value(text, "pagedserve:time_to_first_token_seconds_count") == 1
    assert value(text, "pagedserve:inter_token_latency_seconds_count") == 4  # 2 gaps in each output
    assert value(text, "pagedserve:request_generation_tokens_sum") == 6


def test_openmetrics_when_asked():
    metrics = FrontendMetrics(MODEL, fake_stats(SCHEDULER_STATS))
    body, content_type = asyncio.run(metrics.render("application/openmetrics-text; version=1.0.0"))
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_token_buckets_are_1_2_5_up_to_the_limit():
    assert token_buckets(600) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


def test_the_stand_alone_endpoint_serves_only_get_metrics():
    metrics = FrontendMetrics(MODEL, fake_stats(SCHEDULER_STATS))

    def fetch(url: str, method: str = "GET") -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, "", ""

    async def go():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with capture_logs() as logs:
            server = asyncio.create_task(serve_metrics(metrics, f"127.0.0.1:{port}"))
            while not any(e["event"] == "frontend.metrics_listening" for e in logs):
                await asyncio.sleep(0.01)
        try:
            base = f"http://127.0.0.1:{port}"
            return (await asyncio.to_thread(fetch, base + "/metrics"), await asyncio.to_thread(fetch, base + "/x"),
                    await asyncio.to_thread(fetch, base + "/metrics", "POST"))
        finally:
            server.cancel()

    (status, content_type, text), (missing, _, _), (post, _, _) = asyncio.run(go())
    assert status == 200 and content_type.startswith("text/plain")
    assert value(text, "pagedserve:num_requests_waiting") == 2
    assert (missing, post) == (404, 405)


def test_speculation_counters_appear_when_speculation_is_on():
    assert "spec_decode" not in render(FrontendMetrics(MODEL, fake_stats(SCHEDULER_STATS)))
    stats = {**SCHEDULER_STATS, "spec_rows": 10, "spec_proposed_tokens": 30, "spec_accepted_tokens": 12,
             "spec_accepted_pos_0": 7, "spec_accepted_pos_1": 4, "spec_accepted_pos_2": 1, "spec_steps_skipped": 0}
    text = render(FrontendMetrics(MODEL, fake_stats(stats)))
    assert value(text, "pagedserve:spec_decode_num_drafts_total") == 10
    assert value(text, "pagedserve:spec_decode_num_draft_tokens_total") == 30
    assert value(text, "pagedserve:spec_decode_num_accepted_tokens_total") == 12
    assert [value(text, "pagedserve:spec_decode_num_accepted_tokens_per_pos_total", position=str(j))
            for j in range(3)] == [7, 4, 1]
