"""The frontend's `FrontendMetrics`, made from the config, and `--metrics-listen`: GET /metrics.

`frontend_metrics` builds the one `FrontendMetrics` of the process (with a span tracer when
`otlp_traces_endpoint` is set); `ResponseStreamer` observes requests into it, and both the HTTP
API's `GET /metrics` and this module's stand-alone endpoint render it. The stand-alone endpoint
is a minimal HTTP/1.1 responder on the frontend's own event loop (asyncio.start_server): it
answers GET (and HEAD) /metrics, one request per connection, and nothing else. On the loop, not
in prometheus_client's server thread, because a scrape awaits the scheduler's figures through
the frontend's own scheduler socket (`EngineClient.stats`), which belongs to this loop.
"""

from __future__ import annotations

import asyncio

from frontend.engine_client import EngineClient
from frontend.engine_status import EngineStatus
from frontend.metrics import STATS_TIMEOUT_S, FrontendMetrics
from shared.config import ServerConfig
from shared.logging import get_logger

log = get_logger()

READ_TIMEOUT_S = 10.0  # a scraper that does not finish its request headers in this time is dropped
MAX_HEADER_BYTES = 16 * 1024


class SchedulerNotReady(Exception):
    pass


def frontend_metrics(config: ServerConfig, model_name: str, engine: EngineClient, status: EngineStatus,
                     max_model_len: int = 1 << 20) -> FrontendMetrics:
    """The process's `FrontendMetrics`: the scheduler's figures through `engine` while `status`
    says it is ready; a span per request when `config.frontend.otlp_traces_endpoint` is set
    (raises `OtelUnavailable` at start-up when OpenTelemetry is not installed). The `model_name`
    label is the served name, as the HTTP API's /v1/models calls the model (as vLLM does)."""
    model_name = config.model.served_model_name or model_name

    async def scheduler_stats() -> dict:
        if not status.ready:
            raise SchedulerNotReady()
        return await engine.stats(timeout=STATS_TIMEOUT_S)

    tracer = None
    if config.frontend.otlp_traces_endpoint:
        from frontend.metrics_otel import otlp_tracer
        tracer = otlp_tracer(config.frontend.otlp_traces_endpoint, model_name)
    return FrontendMetrics(model_name, scheduler_stats, max_model_len=max_model_len, tracer=tracer)


def split_host_port(listen: str) -> tuple[str, int]:
    """"HOST:PORT" (an IPv6 host in brackets: "[::1]:9100") -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def serve_metrics(metrics: FrontendMetrics, listen: str) -> None:
    """Serve GET /metrics on `listen` ("HOST:PORT") until cancelled. A bind error raises."""
    host, port = split_host_port(listen)
    server = await asyncio.start_server(lambda r, w: _answer(metrics, r, w), host, port, limit=MAX_HEADER_BYTES)
    log.info("frontend.metrics_listening", listen=listen)
    async with server:
        await server.serve_forever()


async def _answer(metrics: FrontendMetrics, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        status, body, content_type = await _respond(metrics, head.decode("latin-1"))
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode("latin-1"))
        if not head.startswith(b"HEAD "):
            writer.write(body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass  # a scraper that went away or sent garbage: nothing to answer
    finally:
        writer.close()


async def _respond(metrics: FrontendMetrics, head: str) -> tuple[str, bytes, str]:
    """(status line, body, content type) for a request head."""
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return "400 Bad Request", b"bad request line\n", "text/plain; charset=utf-8"
    method, target, _version = parts
    if target.split("?", 1)[0] != "/metrics":
        return "404 Not Found", b"only /metrics is served here\n", "text/plain; charset=utf-8"
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", b"GET /metrics\n", "text/plain; charset=utf-8"
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    body, content_type = await metrics.render(accept)
    return "200 OK", body, content_type
