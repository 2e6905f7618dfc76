"""Send benchmark requests to a running pagedserve through the client SDK and time every token.

Two modes, as `vllm bench serve` has them:

* throughput: every request submitted at once (rate = inf);
* serve: arrivals at `rate` requests/s, inter-arrival gaps drawn from a gamma
  distribution with shape `burstiness` (1.0 = Poisson), optionally at most
  `max_concurrency` requests in flight.

Each request streams greedy tokens with ignore_eos and max_tokens = its output length,
so the server does exactly the work the peers do. While the run lasts the server's
stats are polled for the KV usage peak and the preemptions.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

from bench.metrics import RequestRecord
from bench.workload import BenchRequest
from shared.client import AsyncClient
from shared.protocol import SamplingParams

STATS_POLL_S = 0.5


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request (the first is sent at once)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)  # gamma scale: mean gap = shape * scale = 1 / rate
    return [0.0] + [rng.gammavariate(burstiness, theta) for _ in range(n - 1)]


async def _one(client: AsyncClient, request: BenchRequest, started: float) -> RequestRecord:
    params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
    record = RequestRecord(prompt_len=len(request.prompt_ids), sent_s=time.perf_counter() - started)
    async for delta in client.stream(request.prompt_ids, params):
        now = time.perf_counter() - started
        record.token_times_s.extend([now] * len(delta.token_ids))
    record.num_output_tokens = len(record.token_times_s)
    if record.num_output_tokens != request.output_len:
        raise RuntimeError(f"asked for {request.output_len} tokens, got {record.num_output_tokens}")
    return record


async def _poll_stats(client: AsyncClient, peaks: dict, stop: asyncio.Event) -> None:
    while not stop.is_set():
        stats = await client.stats()
        total = max(1, stats.get("kv_blocks_total", 1))
        peaks["kv_usage_peak"] = max(peaks.get("kv_usage_peak", 0.0), stats.get("kv_blocks_used", 0) / total)
        peaks["running_peak"] = max(peaks.get("running_peak", 0), stats.get("running", 0))
        try:
            await asyncio.wait_for(stop.wait(), STATS_POLL_S)
        except asyncio.TimeoutError:
            pass


async def run_requests(address: str, requests: list[BenchRequest], *, rate: float = math.inf,
                       burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                       progress: Callable[[int], None] = lambda n: None) -> tuple[list[RequestRecord], float, dict]:
    """-> (records in request order, wall seconds, server figures: KV usage peak, preemptions, ...)."""
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with AsyncClient(address, timeout=None) as client:
        before = await client.stats()
        peaks: dict = {}
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_stats(client, peaks, stop))
        finished = 0

        async def run_one(request: BenchRequest) -> RequestRecord:
            nonlocal finished
            if limit is None:
                record = await _one(client, request, started)
            else:
                async with limit:
                    record = await _one(client, request, started)
            finished += 1
            progress(finished)
            return record

        started = time.perf_counter()
        tasks = []
        for gap, request in zip(gaps, requests):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(run_one(request)))
        try:
            records = await asyncio.gather(*tasks)
        finally:
            duration = time.perf_counter() - started
            stop.set()
            await poller
        after = await client.stats()
    figures = {key: after.get(key, 0) - before.get(key, 0) for key in ("preemptions", "prefix_cache_hit_tokens")}
    figures.update({k: round(v, 4) for k, v in peaks.items()})
    return list(records), duration, figures
