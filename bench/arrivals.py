"""The arrival process every backend's driver shares: when each request is sent, how many are
in flight, and what a request that fails leaves behind.

Two modes, as `vllm bench serve` has them:

* throughput: every request submitted at once (rate = inf);
* serve: arrivals at `rate` requests/s, inter-arrival gaps drawn from a gamma
  distribution with shape `burstiness` (1.0 = Poisson), optionally at most
  `max_concurrency` requests in flight.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable

from bench.metrics import RequestRecord
from bench.workload import BenchRequest

# send(request, record, started): streams one request, filling record.token_times_s (seconds
# since `started`, a perf_counter value) and record.num_output_tokens; raises when it fails.
Send = Callable[[BenchRequest, RequestRecord, float], Awaitable[None]]


class RequestFailed(Exception):
    """A request the server answered wrongly (an error, too few tokens, a stream cut short);
    its message is what the report shows."""


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request (the first is sent at once)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)  # gamma scale: mean gap = shape * scale = 1 / rate
    return [0.0] + [rng.gammavariate(burstiness, theta) for _ in range(n - 1)]


def _message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, RequestFailed) else f"{type(exc).__name__}: {exc}"


async def dispatch(requests: list[BenchRequest], send: Send, *, rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0,
                   progress: Callable[[int], None] = lambda n: None) -> tuple[list[RequestRecord], float]:
    """Send every request on the arrival schedule -> (records in request order, wall seconds).

    A request that raises is recorded with its error instead of ending the run: the summary
    counts it as failed, so a server that rejects a few requests still gets measured."""
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    finished = 0

    async def one(request: BenchRequest) -> RequestRecord:
        # sent_s is taken inside the semaphore: with --max-concurrency a request's latency
        # starts when it is sent, not while it waits for a slot (as vLLM measures it).
        record = RequestRecord(prompt_len=len(request.prompt_ids), sent_s=time.perf_counter() - started)
        try:
            await send(request, record, started)
        except Exception as exc:  # noqa: BLE001 - any failure of one request is that request's
            record.error = _message(exc)
        return record

    async def run_one(request: BenchRequest) -> RequestRecord:
        nonlocal finished
        if limit is None:
            record = await one(request)
        else:
            async with limit:
                record = await one(request)
        finished += 1
        progress(finished)
        return record

    started = time.perf_counter()
    tasks = []
    for gap, request in zip(gaps, requests):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(run_one(request)))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - started
