"""Moving requests off an engine replica that stopped making progress (docs/data_parallel.md).

With several replicas, one that goes silent past replica_silence_s (dead, or hung), or loses
workers, has its requests held and resubmitted to the others, with the tokens already streamed
(frontend/resubmit.py: new engine ids, the old ones aborted first, so nothing is duplicated).
A draining replica (SIGTERM) keeps what it runs and gets nothing new; a request it refuses with
`shutting_down` is sent elsewhere instead of failing. With one replica none of this applies: its
requests wait for it, as they always did.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from frontend.fleet_status import FleetStatus
from frontend.replicas import LIVENESS_EVERY_S, Replica, ReplicaSet
from frontend.resubmit import Resubmitter
from shared import protocol as p
from shared.logging import get_logger

log = get_logger()


class Failover:
    """Holds no state of its own: acts on the `ReplicaSet`'s replicas and resubmits through the
    `Resubmitter` when any replica is ready (`status.ready`)."""

    def __init__(self, replicas: ReplicaSet, status: FleetStatus, resubmitter: Resubmitter,
                 stats_interval_s: float = 10.0) -> None:
        self._replicas = replicas
        self._status = status
        self._resubmitter = resubmitter
        self._stats_interval_s = stats_interval_s

    async def liveness_loop(self) -> None:
        """Every LIVENESS_EVERY_S: a replica silent past replica_silence_s is taken as dead.
        With several replicas, every stats_interval_s: `frontend.replicas` (their figures)."""
        next_stats = time.monotonic() + self._stats_interval_s
        while True:
            await asyncio.sleep(LIVENESS_EVERY_S)
            now = time.monotonic()
            gone = self._replicas.silent(now)
            for replica in gone:
                self.replica_down(replica, "silent")
            if gone:
                await self.resubmit_if_ready()
            if now >= next_stats and len(self._replicas) > 1:
                next_stats = now + self._stats_interval_s
                figures = [r.figures() for r in self._replicas.replicas]
                log.info("frontend.replicas", replicas=figures,
                         routed={c: sum(f["routed"].get(c, 0) for f in figures) for c in
                                 {c for f in figures for c in f["routed"]}})

    def replica_down(self, replica: Replica, cause: str) -> None:
        """`replica` stalls: its requests are held for the others (with one replica: nothing)."""
        if len(self._replicas.replicas) > 1:
            self._replicas.fail_over(replica, cause)

    async def resubmit_if_ready(self) -> None:
        if self._status.ready:
            await self._resubmitter.resubmit_held()

    def refused(self, replica: Replica, code: str) -> bool:
        """`replica` refused a request with `code`: True when the request is to be held (and
        resubmitted) rather than failed. `unavailable` (a restarted scheduler without workers
        yet): held, and the replica takes nothing more until its next EngineInfo says it is ready
        (no resubmission loop meanwhile). `shutting_down` from one of several replicas (it
        drains): held for another, unless none is left."""
        if code == p.ErrorCode.UNAVAILABLE.value:
            if replica.status.latest is not None:
                replica.status.latest = msgspec.structs.replace(replica.status.latest, ready=False)
            return True
        if code != p.ErrorCode.SHUTTING_DOWN.value or len(self._replicas) == 1:
            return False
        if replica.load is not None:  # take it out of routing now, not at its next report
            replica.load = msgspec.structs.replace(replica.load, draining=True)
        return any(r.routable for r in self._replicas.replicas)

    def drained_away(self, replica: Replica, delta: p.TokenDelta) -> bool:
        """A draining replica that ran out of drain_timeout_s aborts what it still runs: with
        another replica to go to, such a request is held (True: `delta` is not streamed) and
        resubmitted there with its tokens, instead of ending with "abort". A client's own abort
        (`FrontendRequest.aborting`) ends as it asked."""
        if (delta.finish_reason != p.FinishReason.ABORT.value or delta.token_ids or not replica.draining
                or len(self._replicas.replicas) == 1):
            return False
        req = self._replicas.table.by_engine_id(delta.request_id)
        if req is None or req.aborting or req.replica != replica.index:
            return False
        if not req.held and not any(r.routable for r in self._replicas.replicas):
            return False
        req.held = True
        return True

    async def on_kv_events(self, replica: Replica, msg: p.KvEvents) -> None:
        was_draining = replica.draining
        if self._replicas.on_kv_events(replica, msg):
            await replica.client.send(p.KvSnapshotQuery())
        if replica.draining and not was_draining:
            log.info("frontend.replica_draining", replica=replica.index, addr=replica.addr)
