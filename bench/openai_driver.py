"""Send benchmark requests to any OpenAI-compatible server (pagedserve's HTTP API, `vllm serve`,
llama.cpp's llama-server) and time every streamed chunk.

Each request is `POST {base_url}/v1/completions` with the prompt as token ids (vLLM, llama.cpp
and OpenAI accept a list of ints), greedy, `max_tokens` = its output length with `ignore_eos`
(vLLM's and llama.cpp's extra field), streamed with a final usage chunk. A chunk's arrival time
(seconds since the run started) is recorded once per token it carries; the request's output
token count is the usage chunk's `completion_tokens` (chunks counted when there is none), so a
server that holds back text (partial UTF-8) still reports every token it made. The arrival
process is bench/arrivals.py's, the same as the ZeroMQ driver's (bench/driver.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import aiohttp

from bench.arrivals import RequestFailed, dispatch
from bench.metrics import RequestRecord
from bench.sse import CompletionStream, SSEDecoder, error_message
from bench.workload import BenchRequest

MODELS_TIMEOUT_S = 10.0  # GET /v1/models: a server that is up answers at once
ERROR_BODY_CHARS = 500  # of a non-JSON error body kept in the message


def api_root(base_url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` -> `http://host:8000`:
    OpenAI clients are often given the `/v1` form, and the paths here add `/v1` themselves."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def completion_body(model: str, request: BenchRequest) -> dict:
    """The JSON of one streamed, greedy completion of exactly `request.output_len` tokens."""
    return {"model": model, "prompt": list(request.prompt_ids), "max_tokens": request.output_len,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}


async def fetch_models(base_url: str, api_key: str | None = None) -> dict:
    """The server's `GET /v1/models` answer, or {"error": why} when there is none."""
    timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=_headers(api_key)) as session:
            async with session.get(api_root(base_url) + "/v1/models") as resp:
                text = await resp.text()
                if resp.status != 200:
                    return {"error": f"HTTP {resp.status}: {text[:ERROR_BODY_CHARS]}"}
                models = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return models if isinstance(models, dict) else {"error": f"not a JSON object: {text[:ERROR_BODY_CHARS]}"}


async def _failure(resp: aiohttp.ClientResponse) -> RequestFailed:
    """A clear message for an answer that is not a 200 event stream."""
    body = await resp.text()
    try:
        message = error_message(json.loads(body))
    except ValueError:
        message = None
    what = f"HTTP {resp.status}" if resp.status != 200 else f"a {resp.content_type} answer, not an event stream"
    return RequestFailed(f"{what}: {message or body[:ERROR_BODY_CHARS]}")


async def _read_stream(resp: aiohttp.ClientResponse, record: RequestRecord, started: float) -> CompletionStream:
    decoder, stream = SSEDecoder(), CompletionStream()
    try:
        async for chunk in resp.content.iter_any():
            now = time.perf_counter() - started  # every event in this read arrived now
            for kind, data in decoder.feed(chunk):
                record.token_times_s.extend([now] * stream.event(kind, data))
    except aiohttp.ClientPayloadError as exc:
        raise RequestFailed(f"the stream was cut short after {len(record.token_times_s)} tokens: {exc}") from None
    now = time.perf_counter() - started
    for kind, data in decoder.close():
        record.token_times_s.extend([now] * stream.event(kind, data))
    return stream


async def _one(session: aiohttp.ClientSession, url: str, model: str, request: BenchRequest,
               record: RequestRecord, started: float) -> None:
    async with session.post(url, json=completion_body(model, request)) as resp:
        if resp.status != 200 or resp.content_type != "text/event-stream":
            raise await _failure(resp)
        stream = await _read_stream(resp, record, started)
    if not stream.complete:
        raise RequestFailed(f"the stream was cut short: no [DONE] and no finish reason after "
                            f"{stream.chunks} chunks ({len(record.token_times_s)} tokens)")
    if not record.token_times_s:
        raise RequestFailed(f"no chunk carried text ({stream.chunks} chunks)")
    count = stream.completion_tokens if stream.completion_tokens is not None else len(record.token_times_s)
    record.num_output_tokens = count
    if count != request.output_len:
        # Every engine must do the same work: a short answer means ignore_eos was not honoured.
        raise RequestFailed(f"asked for {request.output_len} tokens, the server generated {count} "
                            f"(finish_reason {stream.finish_reason!r}): does it honour ignore_eos?")


async def run_requests(base_url: str, model: str, requests: list[BenchRequest], *, api_key: str | None = None,
                       rate: float = math.inf, burstiness: float = 1.0, max_concurrency: int | None = None,
                       seed: int = 0, progress: Callable[[int], None] = lambda n: None,
                       ) -> tuple[list[RequestRecord], float, dict]:
    """-> (records in request order, wall seconds, {}: an HTTP server reports no KV figures)."""
    url = api_root(base_url) + "/v1/completions"
    # limit=0: no cap on open connections (aiohttp's default is 100), so the concurrency is the
    # arrival process's alone; no total timeout, as a queued request may wait minutes on a CPU.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=_headers(api_key)) as session:
        records, duration = await dispatch(
            requests, lambda request, record, started: _one(session, url, model, request, record, started),
            rate=rate, burstiness=burstiness, max_concurrency=max_concurrency, seed=seed, progress=progress)
    return records, duration, {}
