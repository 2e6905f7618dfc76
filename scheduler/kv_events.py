"""Prefix-cache events and load, published to the frontends for routing (docs/data_parallel.md).

The `PrefixCache` tells its `KvJournal` each key stored and evicted; every PUBLISH_EVERY_S the
`KvPublisher` turns what the journal gathered into one `KvEvents` for every frontend, with the
load (waiting, running, free blocks, step time). Frontends keep an index of each replica's keys
(frontend/prefix_index.py) and ask for a snapshot when they see a gap in `seq`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared import protocol as p
from shared.block_hash import BlockHash, route_key
from shared.logging import get_logger

log = get_logger()

PUBLISH_EVERY_S = 0.1  # the bound on how stale a frontend's view of load may be


class KvJournal:
    """The keys whose cached state changed since the last `take()`, netted: key -> True (stored)
    or False (evicted), whichever happened last. `reset`: the whole cache was cleared, so only
    a snapshot can tell the frontends what is left."""

    def __init__(self) -> None:
        self._changes: dict[int, bool] = {}
        self.reset = False

    def stored(self, key: BlockHash) -> None:
        self._changes[route_key(key)] = True

    def removed(self, key: BlockHash) -> None:
        self._changes[route_key(key)] = False

    def cleared(self) -> None:
        self._changes.clear()
        self.reset = True

    def take(self) -> tuple[list[int], list[int], bool]:
        """(stored, removed, reset) since the last take; empties the journal."""
        stored = [k for k, present in self._changes.items() if present]
        removed = [k for k, present in self._changes.items() if not present]
        reset, self.reset = self.reset, False
        self._changes.clear()
        return stored, removed, reset


class KvPublisher:
    """Owns `seq` (messages published by this scheduler process) and the journal attached to the
    current `Scheduler`'s prefix cache. `scheduler()`: the Scheduler now (None before the workers
    joined); `broadcast(msg)`: to every known frontend; `step_time_s()`: the median step time;
    `draining()`: whether the scheduler is stopping (frontends then send new work elsewhere)."""

    def __init__(self, scheduler_id: str, scheduler: Callable, broadcast: Callable[[p.KvEvents], None],
                 step_time_s: Callable[[], float], draining: Callable[[], bool] = lambda: False) -> None:
        self.scheduler_id = scheduler_id
        self._scheduler = scheduler
        self._broadcast = broadcast
        self._step_time_s = step_time_s
        self._draining = draining
        self.seq = 0
        self._attached = None  # the Scheduler whose cache has our journal
        self._journal = KvJournal()
        self._next_at = 0.0

    def due_in_s(self, now: float) -> float:
        """Seconds until the next publication (the loop polls no longer than this)."""
        return max(0.0, self._next_at - now)

    def tick(self, now: float | None = None) -> None:
        """Publish if PUBLISH_EVERY_S passed: the changes since the last message, or a snapshot
        when the cache is new (a new Scheduler after the workers joined) or was cleared."""
        now = time.monotonic() if now is None else now
        if now < self._next_at:
            return
        self._next_at = now + PUBLISH_EVERY_S
        sched = self._scheduler()
        if sched is None:
            return
        if sched is not self._attached:
            self._attached = sched
            self._journal = KvJournal()
            sched.block_manager.prefix_cache.journal = self._journal
            self._journal.reset = True
        stored, removed, reset = self._journal.take()
        self.seq += 1
        if reset:
            self._broadcast(self.snapshot())
            return
        self._broadcast(self._message(stored=stored, removed=removed))

    def snapshot(self) -> p.KvEvents:
        """Every cached key now, under the current `seq` (for a new frontend, or one that saw a gap).
        Changes still in the journal are published next, on top of it: re-storing a listed key or
        evicting an absent one changes nothing, so the frontend's view stays right."""
        sched = self._scheduler()
        keys = [route_key(k) for k, _ in sched.block_manager.prefix_cache.items()] if sched is not None else []
        return self._message(stored=keys, snapshot=True)

    def _message(self, **kw) -> p.KvEvents:
        sched = self._scheduler()
        if sched is None:
            return p.KvEvents(scheduler_id=self.scheduler_id, seq=self.seq, draining=self._draining(), **kw)
        s = sched.stats()  # a few dozen gauges and counters: cheap at 10 a second
        return p.KvEvents(scheduler_id=self.scheduler_id, seq=self.seq, waiting=s["waiting"], running=s["running"],
                          free_blocks=s["kv_blocks_total"] - s["kv_blocks_used"], total_blocks=s["kv_blocks_total"],
                          step_time_ms=round(self._step_time_s() * 1000, 3),
                          prefix_hit_tokens=s["prefix_cache_hit_tokens"],
                          prefix_queried_tokens=s["prefix_cache_queried_tokens"], draining=self._draining(), **kw)
