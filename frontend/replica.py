"""One engine replica as a frontend sees it (docs/data_parallel.md): its client, status,
prefix index, load and routing counts. The set of them, and routing: frontend/replicas.py."""

from __future__ import annotations

import asyncio
import collections

from frontend.engine_client import EngineClient
from frontend.engine_status import EngineStatus
from frontend.prefix_index import PrefixIndex
from frontend.resubmit import Resubmitter
from shared import protocol as p


class Replica:
    """One engine replica as this frontend sees it. Owns its client, status, prefix index, load
    and counters (`routed` by cause)."""

    def __init__(self, index: int, addr: str, client: EngineClient, status: EngineStatus,
                 resubmitter: Resubmitter) -> None:
        self.index, self.addr = index, addr
        self.client, self.status, self.resubmitter = client, status, resubmitter
        self.prefix = PrefixIndex()
        self.load: p.KvEvents | None = None  # its last report
        self.sent_since_report = 0  # requests sent to it since `load`
        self.last_heard: float | None = None  # monotonic seconds; None: never
        self.alive = True  # False once silent past replica_silence_s, until it speaks again
        self.routed: collections.Counter[str] = collections.Counter()
        self.one_of_several = False  # set by ReplicaSet: failover needs another replica to go to
        self.retired = False  # left the engines list: gets nothing new; closed once its requests finished
        self.closed = False
        self.tasks: list[asyncio.Task] = []  # its client's receive and ping loops

    @property
    def healthy(self) -> bool:
        """Alive, ready, every worker joined: its requests make progress. (The only replica is
        healthy while ready: its requests wait there for its workers, as they always did.)"""
        info = self.status.latest
        if not self.one_of_several:
            return self.status.ready
        return self.alive and self.status.ready and info is not None and info.workers_ready >= info.workers_expected

    @property
    def draining(self) -> bool:
        return self.load is not None and self.load.draining

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining and not self.retired

    def load_now(self) -> int:
        """Requests: waiting + running at its last report, plus those sent since."""
        base = self.load.waiting + self.load.running if self.load is not None else 0
        return base + self.sent_since_report

    def figures(self) -> dict:
        """Per-replica stats: load, routing decisions by cause, prefix-cache hit rate."""
        load = self.load or p.KvEvents(scheduler_id="", seq=0)
        queried = load.prefix_queried_tokens
        return {"index": self.index, "addr": self.addr, "routable": self.routable, "alive": self.alive,
                "draining": self.draining, "retired": self.retired,
                "scheduler_id": self.status.latest.scheduler_id if self.status.latest else "",
                "waiting": load.waiting, "running": load.running, "free_blocks": load.free_blocks,
                "total_blocks": load.total_blocks, "step_time_ms": load.step_time_ms,
                "prefix_cache_hit_tokens": load.prefix_hit_tokens, "prefix_cache_queried_tokens": queried,
                "prefix_cache_hit_rate": round(load.prefix_hit_tokens / queried, 4) if queried else 0.0,
                "cached_blocks_indexed": len(self.prefix.keys), "kv_event_gaps": self.prefix.gaps,
                "routed": dict(self.routed)}
