"""The engine replicas a frontend sends requests to (docs/data_parallel.md), behind the interface
of one `EngineClient` (add, send, abort, finish_outputs, stats), so the rest of the frontend
need not know how many there are.

A replica is one scheduler process and its workers; the frontend holds, per replica, a DEALER
(`EngineClient`), its last `EngineInfo` (`EngineStatus`), a `Resubmitter` that notices that
scheduler restarting, the `PrefixIndex` of its cache and its last reported load (`KvEvents`).

A replica takes new requests while it is *routable*: it answered within replica_silence_s, is
ready with all its workers, and is not draining. When it stops being so in a way that stalls its
requests (silent: dead or hung; its workers lost), they fail over: held, their old engine ids
aborted there, and resubmitted to a routable replica with the tokens already streamed
(frontend/resubmit.py); a draining replica keeps its requests until they finish.
"""

from __future__ import annotations

import asyncio
import collections
import time

import zmq.asyncio

from frontend.engine_client import EngineClient
from frontend.engine_status import EngineStatus
from frontend.replica import Replica
from frontend.requests import FrontendRequest, RequestTable
from frontend.resubmit import Resubmitter
from frontend.router import Candidate, RoutingPolicy
from shared import protocol as p
from shared.block_hash import block_hashes, route_key
from shared.config import ServerConfig
from shared.logging import get_logger

log = get_logger()

LIVENESS_EVERY_S = 0.25


class ReplicaSet:
    """Every replica, and the routing between them. Quacks like one `EngineClient` for the
    frontend's other parts; `on_message(replica, msg)` gets every scheduler message.

    Owns `where` (engine id -> replica index of requests sent and not yet known finished, pruned
    every LIVENESS_EVERY_S) so an abort sent after the request left the table still finds its
    replica."""

    def __init__(self, ctx: zmq.asyncio.Context, config: ServerConfig, table: RequestTable, on_message) -> None:
        routing = config.routing
        self._table = table
        self._ctx, self._on_message, self._listen = ctx, on_message, config.endpoints.listen
        self._curve = routing.engine_curve_keys()
        self.policy = RoutingPolicy(routing.routing_policy, routing.routing_load_margin)
        self.silence_s = routing.replica_silence_s
        self.replicas: list[Replica] = []  # by index; a retired one stays (closed), so indexes never move
        self._failed: asyncio.Future | None = None  # set by `run`: a replica's loop failed
        for addr in routing.resolved_engines(config.endpoints.scheduler_addr_for_frontends()):
            self._add(addr)
        self.where: dict[str, int] = {}
        self.frontend_id = self.replicas[0].client.frontend_id

    @property
    def table(self) -> RequestTable:
        return self._table

    def __len__(self) -> int:
        """Replicas in the engines list (retired ones not counted)."""
        return sum(not r.retired for r in self.replicas)

    def _add(self, addr: str) -> Replica:
        i = len(self.replicas)
        client = EngineClient(self._ctx, addr, lambda msg: self._on_message(self.replicas[i], msg), self._curve)
        replica = Replica(i, addr, client, EngineStatus(self._listen),
                          Resubmitter(self, self._table, owns=lambda req: req.replica == i))
        self.replicas.append(replica)
        for r in self.replicas:
            r.one_of_several = len(self.replicas) > 1
        if self._failed is not None:  # running already: a replica that joins at runtime
            self._start(replica)
        return replica

    def set_engines(self, addrs: list[str]) -> tuple[list[str], list[str]]:
        """Replicas join and leave at runtime (SIGHUP re-reads `[routing] engines`): a new address
        gets a replica, a missing one is retired: it gets nothing new, its requests finish there,
        then its socket closes. (added, retired) addresses."""
        listed = {r.addr: r for r in self.replicas if not r.retired}
        added = [a for a in addrs if a not in listed]
        retired = [r for a, r in listed.items() if a not in addrs]
        if not addrs or not added and not retired:
            return [], []
        for r in retired:
            r.retired = True
            self.policy.forget_replica(r.index)
        for addr in added:
            self._add(addr)
        for r in self.replicas:
            r.one_of_several = len(self.replicas) > 1
        log.info("frontend.engines_changed", added=added, retired=[r.addr for r in retired],
                 engines=[r.addr for r in self.replicas if not r.retired])
        return added, [r.addr for r in retired]

    # -- EngineClient's interface ----------------------------------------------------
    async def add(self, request_id: str, prompt_ids: list[int], params: p.SamplingParams, arrival: float,
                  priority: int, trace_id: str = "") -> None:
        await self.send(p.AddRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=params,
                                     arrival_time=arrival, priority=priority, trace_id=trace_id))

    async def send(self, msg: p.FrontendMessage) -> None:
        """An `AddRequest` goes to the replica the router picks (a resubmission counts as a
        failover); anything else to every replica."""
        if not isinstance(msg, p.AddRequest):
            for r in self.replicas:
                if not r.closed:
                    await r.client.send(msg)
            return
        req = self._table.by_engine_id(msg.request_id)
        target = self.route(req, msg.prompt_token_ids, msg.params.session_key)
        if target is None:  # no replica can take it now: it waits for one
            if req is not None:
                req.held = True
            return
        await target.client.send(msg)

    def route(self, req: FrontendRequest | None, prompt_ids: list[int], session_key: str) -> Replica | None:
        candidates = [r for r in self.replicas if r.routable]
        if not candidates:
            return None
        block_size = candidates[0].status.info.block_size if candidates[0].status.info else 0
        keys = [route_key(k) for k in block_hashes(prompt_ids, block_size)] if block_size else []
        index, cause = self.policy.choose(
            [Candidate(r.index, r.load_now(), r.prefix.matched_blocks(keys)) for r in candidates], session_key)
        if req is not None and req.replica >= 0 and req.attempt > 0:
            cause = "failover"  # a resubmission: its replica failed or restarted
        target = self.replicas[index]
        target.routed[cause] += 1
        target.sent_since_report += 1
        if req is not None:
            req.replica = index
            self.where[req.engine_id] = index
        log.debug("frontend.routed", request_id=req.request_id if req else "", replica=index, cause=cause)
        return target

    def _owner(self, engine_id: str) -> Replica | None:
        req = self._table.by_engine_id(engine_id)
        index = req.replica if req is not None and req.replica >= 0 else self.where.get(engine_id, -1)
        return self.replicas[index] if index >= 0 else None

    async def abort(self, request_ids: list[str]) -> None:
        """Each id to its replica; an id whose replica is unknown to every replica."""
        by_replica: dict[int, list[str]] = collections.defaultdict(list)
        for engine_id in request_ids:
            owner = self._owner(engine_id)
            for r in [owner] if owner is not None else self.replicas:
                if not r.closed:
                    by_replica[r.index].append(engine_id)
        for index, ids in by_replica.items():
            await self.replicas[index].client.abort(ids)

    async def finish_outputs(self, outputs: list[tuple[str, int]]) -> None:
        by_replica: dict[int, list[tuple[str, int]]] = collections.defaultdict(list)
        for engine_id, index in outputs:
            owner = self._owner(engine_id)
            for r in [owner] if owner is not None else self.replicas:
                if not r.closed:
                    by_replica[r.index].append((engine_id, index))
        for index, outs in by_replica.items():
            await self.replicas[index].client.finish_outputs(outs)

    async def stats(self, timeout: float = 5.0) -> dict:
        """One replica: its scheduler's stats. Several: numbers summed over the ready ones (the hit
        rate recomputed from the sums), and under "replicas" each one's figures."""
        from frontend.replica_stats import merged_stats

        ready = [r for r in self.replicas if r.status.ready and not r.closed]
        results = await asyncio.gather(*(r.client.stats(timeout) for r in ready), return_exceptions=True)
        per_replica = {r.index: s for r, s in zip(ready, results, strict=True) if isinstance(s, dict)}
        if not per_replica and ready:
            raise TimeoutError("no replica answered")
        return merged_stats(per_replica, [r.figures() for r in self.replicas])

    async def run(self) -> None:
        """Every replica's receive and ping loops, those that join later too; raises what one raises."""
        self._failed = asyncio.get_running_loop().create_future()
        for r in self.replicas:
            self._start(r)
        try:
            await self._failed
        finally:
            for r in self.replicas:
                for t in r.tasks:
                    t.cancel()

    def _start(self, replica: Replica) -> None:
        for coro in (replica.client.run(), replica.client.ping_loop()):
            task = asyncio.create_task(coro)
            task.add_done_callback(self._loop_ended)
            replica.tasks.append(task)

    def _loop_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and not self._failed.done():
            self._failed.set_exception(task.exception())

    def close(self) -> None:
        for r in self.replicas:
            if not r.closed:
                r.closed = True
                r.client.close()

    def _close_retired(self) -> None:
        """A retired replica with no request left: its loops stop and its socket closes."""
        for r in self.replicas:
            if r.retired and not r.closed and not any(req.replica == r.index for req in self._table):
                for t in r.tasks:
                    t.cancel()
                r.closed = True
                r.client.close()
                log.info("frontend.replica_retired", replica=r.index, addr=r.addr)

    # -- replica health ------------------------------------------------------------------
    def heard(self, replica: Replica) -> None:
        replica.last_heard = time.monotonic()
        if not replica.alive:
            replica.alive = True
            log.info("frontend.replica_up", replica=replica.index, addr=replica.addr)

    def on_kv_events(self, replica: Replica, msg: p.KvEvents) -> bool:
        """Apply a replica's report; True when it must be asked for a snapshot (a gap)."""
        replica.load, replica.sent_since_report = msg, 0
        outcome = replica.prefix.apply(msg)
        if outcome == "gap":
            log.info("frontend.kv_events_gap", replica=replica.index, seq=msg.seq, scheduler_id=msg.scheduler_id)
        return outcome == "gap"

    def silent(self, now: float) -> list[Replica]:
        """Replicas that just went silent past replica_silence_s (now taken as dead). The only
        replica is never declared dead: its requests wait for it (frontend/resubmit.py)."""
        self._close_retired()
        gone = []
        for r in self.replicas if len(self.replicas) > 1 else []:
            if r.alive and r.last_heard is not None and now - r.last_heard > self.silence_s:
                r.alive = False
                gone.append(r)
        self.where = {e: i for e, i in self.where.items() if self._table.by_engine_id(e) is not None}
        return gone

    def fail_over(self, replica: Replica, cause: str) -> list[FrontendRequest]:
        """Hold `replica`'s requests for another replica (resubmitted by `Resubmitter.resubmit_held`,
        which aborts their old engine ids there first). Its cache index is dropped."""
        moved = [req for req in self._table if req.replica == replica.index and not req.held]
        for req in moved:
            req.held = True
        replica.prefix.clear()
        replica.load = None
        self.policy.forget_replica(replica.index)
        log.warning("frontend.replica_down", replica=replica.index, addr=replica.addr, cause=cause,
                    requests_moved=[req.request_id for req in moved])
        return moved
