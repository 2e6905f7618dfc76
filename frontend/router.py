"""Which engine replica gets a request (docs/data_parallel.md): the routing decision alone,
without sockets, so tests drive it directly.

Policies (--routing-policy):
  prefix        the replica with the longest cached prefix of the prompt (cause "prefix"), unless
                its load exceeds the least loaded replica's by more than --routing-load-margin;
                then, and when no replica has any of it, the least loaded one (cause "load").
                A request with a session key goes where its session went last (cause "affinity"),
                under the same margin.
  least_loaded  the least loaded replica (cause "load").
  round_robin   each replica in turn (cause "round_robin"); a baseline for benchmarks.
A resubmission after its replica failed is counted as cause "failover", whichever replica it gets.

Load is in requests: waiting + running as the replica last reported (every 0.1 s), plus the
requests this frontend sent it since that report, so a burst does not all go to one replica.
Ties go round: equal candidates take turns.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

MAX_SESSIONS = 65536  # session keys remembered (least recently used forgotten first)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A replica that may take a request now. `load`: requests; `matched`: the prompt's leading
    blocks cached there."""

    index: int
    load: int
    matched: int = 0


class RoutingPolicy:
    """Owns the round-robin turn and the session table (session key -> replica index)."""

    def __init__(self, policy: str = "prefix", margin: int = 8) -> None:
        self.policy = policy
        self.margin = margin
        self._turn = 0
        self._sessions: collections.OrderedDict[str, int] = collections.OrderedDict()

    def choose(self, candidates: list[Candidate], session_key: str = "") -> tuple[int, str]:
        """(replica index, cause) for a request; `candidates` non-empty."""
        assert candidates, "no replica to route to"
        self._turn += 1
        if self.policy == "round_robin":
            return candidates[self._turn % len(candidates)].index, "round_robin"
        least = min(c.load for c in candidates)
        index, cause = self._choose(candidates, least, session_key)
        if session_key:
            self._sessions[session_key] = index
            self._sessions.move_to_end(session_key)
            if len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return index, cause

    def _choose(self, candidates: list[Candidate], least: int, session_key: str) -> tuple[int, str]:
        if self.policy == "prefix":
            if session_key and (last := self._sessions.get(session_key)) is not None:
                sticky = next((c for c in candidates if c.index == last), None)
                if sticky is not None and sticky.load - least <= self.margin:
                    return sticky.index, "affinity"
            best = max(c.matched for c in candidates)
            if best > 0:
                near = [c for c in candidates if c.matched == best and c.load - least <= self.margin]
                if near:
                    return self._take_turn(near, min(c.load for c in near)), "prefix"
        return self._take_turn(candidates, least), "load"

    def _take_turn(self, candidates: list[Candidate], load: int) -> int:
        tied = [c for c in candidates if c.load == load]
        return tied[self._turn % len(tied)].index

    def forget_replica(self, index: int) -> None:
        """Sessions on a replica that left start afresh."""
        for key in [k for k, i in self._sessions.items() if i == index]:
            del self._sessions[key]
