"""Send benchmark requests to a running pagedserve through the client SDK and time every token.

The arrival process (all at once, or Poisson/gamma arrivals at a rate, optionally with a
concurrency cap) is bench/arrivals.py's, shared with the OpenAI HTTP driver
(bench/openai_driver.py). Each request streams greedy tokens with ignore_eos and max_tokens =
its output length, so the server does exactly the work the peers do. While the run lasts the
server's stats are polled for the KV usage peak and the preemptions.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from bench.arrivals import RequestFailed, arrival_gaps, dispatch
from bench.metrics import RequestRecord
from bench.workload import BenchRequest
from shared.client import AsyncClient
from shared.protocol import SamplingParams

__all__ = ["arrival_gaps", "run_requests"]

STATS_POLL_S = 0.5
# The server's counters differenced over a run: preemptions, cache hits, and the steps' make-up
# (scheduler/step_budget.py: decode and prefill tokens, steps over --target-tpot-ms).
COUNTED = ("preemptions", "prefix_cache_hit_tokens", "steps", "step_decode_tokens", "step_prefill_tokens",
           "steps_over_target")


async def _one(client: AsyncClient, request: BenchRequest, record: RequestRecord, started: float) -> None:
    params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
    async for delta in client.stream(request.prompt_ids, params):
        now = time.perf_counter() - started
        record.token_times_s.extend([now] * len(delta.token_ids))
        record.token_ids.extend(delta.token_ids)
    record.num_output_tokens = len(record.token_times_s)
    if record.num_output_tokens != request.output_len:
        raise RequestFailed(f"asked for {request.output_len} tokens, got {record.num_output_tokens}")


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
    async with AsyncClient(address, timeout=None) as client:
        before = await client.stats()
        peaks: dict = {}
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_stats(client, peaks, stop))
        try:
            records, duration = await dispatch(
                requests, lambda request, record, started: _one(client, request, record, started),
                rate=rate, burstiness=burstiness, max_concurrency=max_concurrency, seed=seed, progress=progress)
        finally:
            stop.set()
            await poller
        after = await client.stats()
    figures = {key: after.get(key, 0) - before.get(key, 0) for key in COUNTED}
    # The poll above samples every STATS_POLL_S and can miss a short run's peak; the scheduler's
    # own high-water mark cannot, when it rose during this run.
    total = max(1, after.get("kv_blocks_total", 1))
    if after.get("kv_blocks_used_peak", 0) > before.get("kv_blocks_used_peak", 0):
        peaks["kv_usage_peak"] = max(peaks.get("kv_usage_peak", 0.0), after["kv_blocks_used_peak"] / total)
    figures.update({k: round(v, 4) for k, v in peaks.items()})
    return records, duration, figures
