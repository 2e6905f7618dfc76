"""Trace context in the frontend (frontend/metrics_trace.py, frontend/metrics_otel.py): the
traceparent rules, the SDK's argument, the trace id on request.finished, and one OpenTelemetry
span per request (with an in-memory exporter; skipped without opentelemetry-sdk)."""

from __future__ import annotations

import pytest
from metrics_fakes import MODEL, TRACEPARENT, FakeClients, FakeEngine, fake_stats, make_request, run_request
from structlog.testing import capture_logs

from frontend.metrics import FrontendMetrics
from frontend.metrics_trace import checked_traceparent, message_trace_id, parse_traceparent, trace_id_of
from frontend.requests import RequestTable
from frontend.streams import ResponseStreamer
from shared import protocol as p


@pytest.mark.parametrize("header,valid", [
    (TRACEPARENT, True),
    ("  " + TRACEPARENT + " ", True),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", True),  # a later version's extra field
    (TRACEPARENT + "-extra", False),  # version 00 has exactly four fields
    (TRACEPARENT.upper(), False),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),
    ("garbage", False),
])
def test_traceparent_format(header, valid):
    assert (parse_traceparent(header) is not None) == valid


def test_a_bad_traceparent_is_ignored_with_a_warning():
    with capture_logs() as logs:
        assert checked_traceparent("00-nope", "r1") == ""
        assert checked_traceparent(None, "r2") == "" and checked_traceparent("", "r3") == ""
        assert checked_traceparent(TRACEPARENT, "r4") == TRACEPARENT
    assert [(e["event"], e["request_id"]) for e in logs] == [("frontend.bad_traceparent", "r1")]
    assert trace_id_of(TRACEPARENT) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert message_trace_id(p.Generate(request_id="g", prompt="x", traceparent=TRACEPARENT)) == trace_id_of(TRACEPARENT)
    assert message_trace_id(p.Generate(request_id="g", prompt="x", traceparent="bad")) == ""
    assert message_trace_id(p.Abort(request_id="g")) == ""


def test_the_sdk_sends_its_traceparent_in_generate():
    from shared.client_base import generate_msg

    decoder = p.decoder_for(p.ClientMessage)
    traced = decoder.decode(p.encode(generate_msg("hi", None, None, None, False, "r", 0, TRACEPARENT)))
    assert traced.traceparent == TRACEPARENT
    plain = generate_msg("hi", None, None, None, False, "r", 0)
    assert plain.traceparent is None and b"traceparent" not in p.encode(plain)


def test_request_finished_carries_the_trace_id():
    table = RequestTable()
    streamer = ResponseStreamer(table, FakeClients(), FakeEngine())
    with capture_logs() as logs:
        run_request(streamer, table, make_request("traced", traceparent=TRACEPARENT), tokens=1)
        run_request(streamer, table, make_request("plain"), tokens=1)
    finished = {e["request_id"]: e for e in logs if e["event"] == "request.finished"}
    assert finished["traced"]["trace_id"] == trace_id_of(TRACEPARENT)
    assert "trace_id" not in finished["plain"]


def test_one_span_per_request_with_genai_attributes():
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from frontend.metrics_otel import SpanTracer

    exporter = InMemorySpanExporter()
    metrics = FrontendMetrics(MODEL, fake_stats({}), tracer=SpanTracer(MODEL, SimpleSpanProcessor(exporter)))
    table = RequestTable()
    streamer = ResponseStreamer(table, FakeClients(), FakeEngine(), observer=metrics)
    run_request(streamer, table, make_request("traced", prompt_len=6, traceparent=TRACEPARENT, max_tokens=3,
                                              temperature=0.5, top_p=0.9), tokens=3)
    run_request(streamer, table, make_request("root"), tokens=1, finish="stop")
    traced, root = exporter.get_finished_spans()
    assert format(traced.context.trace_id, "032x") == trace_id_of(TRACEPARENT)
    assert format(traced.parent.span_id, "016x") == "00f067aa0ba902b7"
    attrs = traced.attributes
    assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.request.max_tokens"] == 3
    assert attrs["gen_ai.request.temperature"] == 0.5 and attrs["gen_ai.request.top_p"] == 0.9
    assert attrs["gen_ai.usage.input_tokens"] == 6 and attrs["gen_ai.usage.output_tokens"] == 3
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("length",)
    assert 0 <= attrs["gen_ai.server.time_to_first_token"] <= (traced.end_time - traced.start_time) / 1e9
    assert traced.start_time == 1_700_000_000 * 10**9
    assert root.parent is None and root.context.trace_id != traced.context.trace_id
