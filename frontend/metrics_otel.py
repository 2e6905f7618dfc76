"""One OpenTelemetry span per request, with the GenAI semantic-convention attributes.

Off by default: only `--otlp-traces-endpoint URL` turns it on, and only then is OpenTelemetry
imported (the optional extra: `pip install 'pagedserve[otel]'`). The span is made when the
request completes, with its start set to the request's arrival (as vLLM does), so nothing is held
per request while it runs. Its parent is the request's traceparent, when it came with one.
Spans leave in batches from the SDK's own thread (BatchSpanProcessor), off the event loop.

The exporter speaks OTLP over HTTP/protobuf to URL (e.g. http://collector:4318/v1/traces), or
gRPC when OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc (needs opentelemetry-exporter-otlp-proto-grpc).
"""

from __future__ import annotations

import os

from frontend.metrics_trace import traceparent_of
from frontend.requests import FrontendRequest
from shared import protocol as p
from shared.logging import get_logger

log = get_logger()

SPAN_NAME = "llm_request"  # vLLM's


class OtelUnavailable(RuntimeError):
    pass


class SpanTracer:
    """Turns each finished request into a span through `processor` (an OpenTelemetry
    SpanProcessor: a BatchSpanProcessor exporting over OTLP, or in tests a simple one)."""

    def __init__(self, model_name: str, processor) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.model_name = model_name
        self.provider = TracerProvider(resource=Resource.create({"service.name": "pagedserve"}))
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("pagedserve.frontend")
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind, self._error = SpanKind.SERVER, Status(StatusCode.ERROR)

    def on_finished(self, req: FrontendRequest, completion_tokens: int, now: float) -> None:
        """`req` completed at `now` (monotonic seconds, as `req.arrival`)."""
        traceparent = traceparent_of(req)
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        start_ns = int(req.arrival_wall * 1e9)
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=self._server_kind, start_time=start_ns,
                                       attributes=self._attributes(req, completion_tokens))
        if p.FinishReason.ERROR.value in req.finish:
            span.set_status(self._error)
        span.end(end_time=start_ns + int(max(0.0, now - req.arrival) * 1e9))

    def _attributes(self, req: FrontendRequest, completion_tokens: int) -> dict:
        params = req.params
        attrs = {"gen_ai.request.model": self.model_name, "gen_ai.response.model": self.model_name,
                 "gen_ai.response.id": req.request_id, "gen_ai.request.temperature": params.temperature,
                 "gen_ai.request.top_p": params.top_p, "gen_ai.usage.input_tokens": len(req.prompt_ids),
                 "gen_ai.usage.output_tokens": completion_tokens,
                 "gen_ai.response.finish_reasons": [f or p.FinishReason.ABORT.value for f in req.finish]}
        if params.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = params.max_tokens
        if params.top_k > 0:
            attrs["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attrs["gen_ai.request.seed"] = params.seed
        if params.n != 1:
            attrs["gen_ai.request.choice.count"] = params.n
        if req.first_token_at is not None:
            attrs["gen_ai.server.time_to_first_token"] = req.first_token_at - req.arrival
        if req.num_preemptions:
            attrs["pagedserve.num_preemptions"] = req.num_preemptions
        return attrs

    def shutdown(self) -> None:
        """Send what is batched (the provider also does at exit)."""
        self.provider.shutdown()


def otlp_tracer(endpoint: str, model_name: str) -> SpanTracer:
    """A `SpanTracer` exporting to `endpoint`; OtelUnavailable names what to install if missing."""
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise OtelUnavailable(f"otlp_traces_endpoint is set but OpenTelemetry is not installed ({e}): "
                              "pip install 'pagedserve[otel]', or leave otlp_traces_endpoint empty") from None
    tracer = SpanTracer(model_name, BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    log.info("frontend.tracing", otlp_traces_endpoint=endpoint)
    return tracer
