"""Prometheus metrics: vLLM's set, under `pagedserve:`, exposed by the frontend alone.

The frontend is the one process that exposes metrics (docs/metrics.md says why): what it sees
itself (TTFT, inter-token latency, end-to-end latency, token counts, finish reasons) it observes
as requests run, through `ResponseStreamer`'s calls below; what the scheduler keeps (sequences
running/waiting/swapped, KV blocks, prefix-cache and preemption totals) it asks for on each
scrape with the stats query it already answers (`EngineClient.stats`), bounded by a short
timeout. The queue and prefill times ride on the first token's `TokenDelta`. So there are no
shared files and no multiprocess mode: one registry per `FrontendMetrics`, one exposer.

Times are `time.monotonic()` seconds, as `FrontendRequest`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from frontend.metrics_replicas import replica_families
from frontend.requests import FrontendRequest
from shared import protocol as p
from shared.logging import get_logger

log = get_logger()

PREFIX = "pagedserve:"
STATS_TIMEOUT_S = 1.0  # a scrape waits this long for the scheduler's figures, then goes without them

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards made for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_tokens: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `max_tokens` (vLLM's build_1_2_5_buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_tokens:
                return buckets
            buckets.append(float(value))
        exponent += 1


class RequestTracer(Protocol):
    """What `FrontendMetrics` hands each finished request to (frontend/metrics_otel.py)."""

    def on_finished(self, req: FrontendRequest, completion_tokens: int, now: float) -> None: ...


class SchedulerCollector:
    """The scheduler's figures as metric families, from the stats dict of the scrape in progress
    (`snapshot`; None: the scheduler did not answer, so only `scheduler_reachable` 0 is given).

    Its totals since start (prefix-cache tokens, preemptions) are counters: a scheduler restart
    starts them from 0 again, which Prometheus reads as a counter reset, as it should."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshot: dict | None = None

    def collect(self) -> Iterator[Metric]:
        stats, labels = self.snapshot, [self.model_name]
        up = GaugeMetricFamily(PREFIX + "scheduler_reachable", "1 when this scrape got the scheduler's figures "
                               "within the timeout, else 0 (and its metrics are absent)", labels=["model_name"])
        up.add_metric(labels, 1.0 if stats is not None else 0.0)
        yield up
        if stats is None:
            return
        for name, key, doc in (("num_requests_running", "running", "Sequences in the running batch (a request "
                                "with n outputs counts n)"),
                               ("num_requests_waiting", "waiting", "Sequences waiting to be scheduled, preempted "
                                "ones included"),
                               ("num_requests_swapped", "swapped", "Sequences swapped out to host memory")):
            yield _gauge(name, doc, labels, stats.get(key, 0))
        total = stats.get("kv_blocks_total", 0)
        yield _gauge("kv_cache_usage_perc", "KV-cache usage: device blocks in use over all blocks (1 = full)",
                     labels, stats.get("kv_blocks_used", 0) / total if total else 0.0)
        yield _counter("prefix_cache_queries", "Prefix-cache queries, in tokens", labels,
                       stats.get("prefix_cache_queried_tokens", 0))
        yield _counter("prefix_cache_hits", "Prefix-cache hits, in tokens", labels,
                       stats.get("prefix_cache_hit_tokens", 0))
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions", "Preemptions by the scheduler, by mode",
                                          labels=["model_name", "mode"])
        for mode in ("recompute", "swap"):
            preemptions.add_metric([self.model_name, mode], stats.get(f"preemptions_{mode}", 0))
        yield preemptions
        yield from self._speculation(stats, labels)
        yield from replica_families(PREFIX, self.model_name, stats.get("replicas") or [])

    def _speculation(self, stats: dict, labels: list[str]) -> Iterator[Metric]:
        """vLLM's speculative-decoding counters, when speculation is on (docs/speculative.md)."""
        if "spec_rows" not in stats:
            return
        for name, key, doc in (("spec_decode_num_drafts", "spec_rows", "Rows that verified a proposal"),
                               ("spec_decode_num_draft_tokens", "spec_proposed_tokens", "Tokens proposed"),
                               ("spec_decode_num_accepted_tokens", "spec_accepted_tokens", "Proposed tokens accepted")):
            yield _counter(name, doc, labels, stats.get(key, 0))
        per_position = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                           "Rows whose proposal at this position (0-based) was accepted",
                                           labels=["model_name", "position"])
        prefix = "spec_accepted_pos_"
        positions = sorted(int(k.removeprefix(prefix)) for k in stats if k.startswith(prefix))
        for position in positions:
            per_position.add_metric([self.model_name, str(position)], stats[f"spec_accepted_pos_{position}"])
        yield per_position


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
    family.add_metric(labels, value)
    return family


def _counter(name: str, doc: str, labels: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
    family.add_metric(labels, value)
    return family


class FrontendMetrics:
    """This frontend's registry and the observations `ResponseStreamer` makes.

    `stats`: the scheduler's stats dict (docs/events.md, scheduler.stats), asked once per
    `render` and given at most `stats_timeout_s`; any failure leaves its metrics out of that
    scrape. `tracer`: given each finished request (an OpenTelemetry span, frontend/metrics_otel.py).
    Keeps nothing per request: token times are the request's own (`FrontendRequest.first_token_at`,
    `last_token_at`), so a request that leaves without a completion leaves nothing behind here."""

    def __init__(self, model_name: str, stats: Callable[[], Awaitable[dict]], *, max_model_len: int = 1 << 20,
                 stats_timeout_s: float = STATS_TIMEOUT_S, tracer: RequestTracer | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.tracer = tracer
        self._stats = stats
        self._stats_timeout_s = stats_timeout_s
        reg, labels = self.registry, ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=reg, buckets=buckets).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=reg).labels(model_name)

        tokens = token_buckets(max_model_len)
        self._ttft = histogram("time_to_first_token_seconds", "Receipt to first generated token", TTFT_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Between two tokens of one output", ITL_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "Receipt to completion", REQUEST_LATENCY_BUCKETS)
        self._queue = histogram("request_queue_time_seconds", "Scheduler receipt to first scheduled",
                                REQUEST_LATENCY_BUCKETS)
        self._prefill = histogram("request_prefill_time_seconds", "First scheduled to first token",
                                  REQUEST_LATENCY_BUCKETS)
        self._decode = histogram("request_decode_time_seconds", "First token to last token", REQUEST_LATENCY_BUCKETS)
        self._req_prompt = histogram("request_prompt_tokens", "Prompt tokens per request", tokens)
        self._req_generation = histogram("request_generation_tokens", "Generated tokens per request (all n outputs)",
                                         tokens)
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that reached their first token")
        self._generation_tokens = counter("generation_tokens", "Generated tokens streamed")
        success = Counter(PREFIX + "request_success", "Requests finished, by finish reason of output 0",
                          ["model_name", "finished_reason"], registry=reg)
        self._success = {r.value: success.labels(model_name, r.value) for r in p.FinishReason}
        self._success_family = success
        self._scheduler = SchedulerCollector(model_name)
        reg.register(self._scheduler)

    # -- observations (frontend/streams.py) --------------------------------------------------
    def on_first_token(self, req: FrontendRequest, delta: p.TokenDelta) -> None:
        """`delta` brought `req`'s first token (`req.first_token_at` is set)."""
        self._ttft.observe(req.first_token_at - req.arrival)
        self._prompt_tokens.inc(len(req.prompt_ids))
        if delta.queue_time_s is not None:
            self._queue.observe(delta.queue_time_s)
        if delta.prefill_time_s is not None:
            self._prefill.observe(delta.prefill_time_s)

    def on_tokens(self, num_tokens: int, gap_s: float | None) -> None:
        """`num_tokens` tokens of one output arrived, `gap_s` seconds after its previous ones
        (None for its first)."""
        self._generation_tokens.inc(num_tokens)
        if gap_s is not None:
            self._itl.observe(gap_s)

    def on_finished(self, req: FrontendRequest, completion_tokens: int, now: float) -> None:
        """`req` completed at `now` (any finish reason: its `Completion` is sent)."""
        self._e2e.observe(now - req.arrival)
        self._req_prompt.observe(len(req.prompt_ids))
        self._req_generation.observe(completion_tokens)
        if req.first_token_at is not None:
            last = max(req.last_token_at.values(), default=now)
            self._decode.observe(max(0.0, last - req.first_token_at))
        reason = req.finish[0] or p.FinishReason.ABORT.value
        counter = self._success.get(reason)
        if counter is None:
            counter = self._success[reason] = self._success_family.labels(self.model_name, reason)
        counter.inc()
        if self.tracer is not None:
            try:
                self.tracer.on_finished(req, completion_tokens, now)
            except Exception:  # tracing must never fail a request
                log.exception("frontend.tracing_failed", request_id=req.request_id)

    # -- exposition ----------------------------------------------------------------------------
    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (body, content type): Prometheus text, or OpenMetrics when `accept`
        (the scrape's Accept header) asks for it. Asks the scheduler for its figures first."""
        try:
            stats = await asyncio.wait_for(self._stats(), self._stats_timeout_s)
        except Exception:  # unreachable, not ready, timed out: scheduler_reachable 0 says so
            stats = None
        encoder, content_type = choose_encoder(accept)
        self._scheduler.snapshot = stats  # no await from here to the encoding: concurrent scrapes keep theirs
        try:
            return encoder(self.registry), content_type
        finally:
            self._scheduler.snapshot = None
