"""What the frontend knows of one replica's prefix cache: the keys it holds, from its `KvEvents`.

The scheduler publishes the keys (shared/block_hash.route_key) it stored and evicted, numbered by
`seq` (scheduler/kv_events.py). The index applies them in order; a message out of order (a gap:
the frontend missed one, or the scheduler restarted) makes the index stale, and it asks for a
snapshot, which replaces everything. While stale it still answers: routing is a hint, the
scheduler's own cache decides what is reused.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared import protocol as p


class PrefixIndex:
    """Keys cached on one replica, as of message `seq` of scheduler process `scheduler_id`.

    Invariant: after `apply` returns "ok" or "snapshot", `keys` is exactly the replica's cache as
    of its message `seq` (given the scheduler's own ordering guarantee, see `KvEvents`)."""

    def __init__(self) -> None:
        self.keys: set[int] = set()
        self.scheduler_id = ""
        self.seq = 0
        self.stale = True  # no snapshot yet: what `keys` holds may be incomplete
        self.gaps = 0  # gaps seen since start (each asked for a snapshot)

    def apply(self, msg: p.KvEvents) -> str:
        """Apply one message: "snapshot" (replaced), "ok" (a delta in order), "gap" (out of order:
        ask the scheduler for a snapshot; the delta is applied anyway, as the best guess), or
        "old" (from before the last snapshot: ignored)."""
        if msg.snapshot:
            self.keys = set(msg.stored)
            self.scheduler_id, self.seq, self.stale = msg.scheduler_id, msg.seq, False
            return "snapshot"
        if msg.scheduler_id == self.scheduler_id and msg.seq <= self.seq:
            return "old"
        in_order = msg.scheduler_id == self.scheduler_id and msg.seq == self.seq + 1 and not self.stale
        if msg.scheduler_id != self.scheduler_id:
            self.keys.clear()  # a new scheduler process: nothing of the old cache is left
        self.keys.difference_update(msg.removed)
        self.keys.update(msg.stored)
        self.scheduler_id, self.seq = msg.scheduler_id, msg.seq
        if in_order:
            return "ok"
        self.stale = True
        self.gaps += 1
        return "gap"

    def clear(self) -> None:
        """The replica is gone: it caches nothing we can count on."""
        self.keys.clear()
        self.stale = True

    def matched_blocks(self, keys: Sequence[int]) -> int:
        """How many of `keys` (a prompt's block keys, first block first) are cached, counting from
        the start up to the first one that is not: the blocks a request there would not compute."""
        n = 0
        for key in keys:
            if key not in self.keys:
                break
            n += 1
        return n
