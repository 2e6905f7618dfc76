"""GET /health: 200 only while the engine makes forward progress.

503, with the status and why, when:
  draining     SIGTERM came: new requests are refused
  starting     no worker was ever ready
  unavailable  the scheduler refuses this frontend, restarts, has no ready worker group, or does
               not answer a stats query within STATS_TIMEOUT_S (dead, or its loop is wedged)
  degraded     fewer worker ranks are ready than the group needs (a rank died and rejoins)
  stalled      the scheduler has requests in flight but has completed no step for
               `stall_after_s` (a wedged worker or scheduler that still answers queries)

Progress is the scheduler's `steps` counter, seen by the probes themselves: nothing runs
between probes. The stall clock starts at the last probe that saw a step completed, no work,
or the first work after none, so a long quiet spell between probes never reads as a stall.
The bound is the scheduler's heartbeat_timeout_s: by the scheduler's own rule a step that
long is a hung worker (docs/http.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from frontend.engine_status import EngineStatus
from frontend.http.shapes import HealthBody
from shared.drain import Drain

STATS_TIMEOUT_S = 2.0  # the scheduler answers in milliseconds; its ping period is 1 s

Stats = Callable[[float], Awaitable[dict]]  # EngineClient.stats(timeout)


class HealthProbe:
    """Owns the progress clock: the `steps` value last seen and since when no step completed
    while there was work (monotonic seconds)."""

    def __init__(self, status: EngineStatus, drain: Drain, stats: Stats, stall_after_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._status = status
        self._drain = drain
        self._stats = stats
        self._stall_after_s = stall_after_s
        self._clock = clock
        self._steps: int | None = None
        self._busy = False
        self._progress_at = clock()

    async def check(self) -> tuple[int, HealthBody]:
        """(HTTP status, body)."""
        status = self._status
        if self._drain.draining:
            return 503, HealthBody("draining", "the server is shutting down")
        if not status.ever_ready:
            return 503, HealthBody("starting", "no worker is ready yet")
        if status.refusal:
            return 503, HealthBody("unavailable", f"the scheduler refuses this frontend: {status.refusal}")
        if not status.ready:
            return 503, HealthBody("unavailable", "the scheduler is restarting or its workers are not ready")
        try:
            # Bounded as a whole: a send to a scheduler that is gone may wait as well.
            stats = await asyncio.wait_for(self._stats(STATS_TIMEOUT_S), STATS_TIMEOUT_S)
        except TimeoutError:
            return 503, HealthBody("unavailable", f"the scheduler did not answer within {STATS_TIMEOUT_S} s")
        expected = status.latest.workers_expected if status.latest is not None else 0
        if stats.get("workers_ready", expected) < expected:
            return 503, HealthBody("degraded", f"{stats.get('workers_ready')} of {expected} worker ranks are ready")
        stalled_s = self._stalled_s(stats.get("steps", 0), stats.get("requests_in_flight", 0) > 0)
        if stalled_s > self._stall_after_s:
            return 503, HealthBody("stalled", f"{stats.get('requests_in_flight')} request(s) in flight and no step "
                                              f"completed for {stalled_s:.0f} s")
        return 200, HealthBody("ok")

    def _stalled_s(self, steps: int, busy: bool) -> float:
        """Seconds since this probe last saw progress, no work, or new work."""
        now = self._clock()
        if not busy or not self._busy or steps != self._steps:
            self._progress_at = now
        self._steps, self._busy = steps, busy
        return now - self._progress_at
