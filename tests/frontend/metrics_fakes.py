"""Fakes and helpers for the frontend's metrics and trace-context tests (test_prometheus_metrics.py,
test_trace_context.py): a request driven through `ResponseStreamer` without sockets or a model."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from frontend.detokenizer import OutputText
from frontend.metrics import FrontendMetrics
from frontend.requests import FrontendRequest, RequestTable
from frontend.streams import ResponseStreamer
from shared import protocol as p

MODEL = "tiny"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class FakeClients:
    def __init__(self):
        self.sent = []

    async def send(self, client, msg):
        self.sent.append(msg)


class FakeEngine:
    async def abort(self, request_ids):
        pass

    async def finish_outputs(self, outputs):
        pass


def fake_stats(stats):
    async def get():
        return dict(stats)
    return get


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]


def render(metrics: FrontendMetrics, accept: str = "") -> str:
    body, content_type = asyncio.run(metrics.render(accept))
    assert content_type.startswith("text/plain")
    return body.decode()


def make_request(rid: str, prompt_len: int = 5, n: int = 1, traceparent: str = "", **params) -> FrontendRequest:
    params = p.SamplingParams(n=n, **params)
    outputs = [OutputText(lambda ids: "x" * len(ids), list(range(prompt_len)), [], False, 0) for _ in range(n)]
    req = FrontendRequest(request_id=rid, client=b"c", stream=False, prompt_ids=list(range(1, prompt_len + 1)),
                          params=params, outputs=outputs, arrival=time.monotonic(), finish=[None] * n,
                          engine_id=rid, arrival_wall=1_700_000_000.0)
    if traceparent:
        req.traceparent = traceparent  # what Intake sets from Generate.traceparent
    return req


def run_request(streamer: ResponseStreamer, table: RequestTable, req: FrontendRequest, tokens: int,
                finish: str = "length") -> None:
    """One output: `tokens` deltas of one token; the first carries the scheduler's timings."""
    table.add(req)

    async def go():
        for i in range(tokens):
            last = i == tokens - 1
            await streamer.on_delta(p.TokenDelta(req.engine_id, 0, [7], finish if last else None,
                                                 queue_time_s=0.5 if i == 0 else None,
                                                 prefill_time_s=0.25 if i == 0 else None))
    asyncio.run(go())
