"""The scheduler's side of its frontends: who is connected, their liveness, and what goes back.

A frontend says `FrontendHello` every second and gets an `EngineInfo` back: that
is the handshake and the heartbeat both ways. Frames from a peer that never said
hello (or was declared gone, or was refused) are not acted on. A frontend silent
for FRONTEND_SILENCE_S, or one a send cannot reach, is gone: its requests are
aborted (their blocks freed), and should it come back (it was only paused)
`EngineInfo.frontend_drops` tells it to resubmit them (frontend/resubmit.py).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import msgspec

from scheduler.request_table import Outputs
from scheduler.router import Router
from shared import protocol as p
from shared.logging import get_logger

log = get_logger()

FRONTEND_SILENCE_S = 30.0  # a frontend pings every second; one silent this long is gone: abort its requests
MAX_DROPPED_FRONTENDS = 1024  # identities remembered for EngineInfo.frontend_drops
MAX_REFUSED_FRONTENDS = 256  # identities remembered so a refusal is logged once each
BROADCAST_SILENCE_S = 2.5  # a frontend pings every second: past this it is paused or gone
UNKNOWN_PEER_LOG_EVERY_S = 10.0  # at most one `scheduler.unknown_frontend` event this often


class FrontendLink:
    """Owns the known frontends (identity -> monotonic seconds of their last message), the
    times each was declared gone (`frontend_drops`), and this process's `scheduler_id`.

    `engine_info()`: the engine's facts now (scheduler/worker_link.py); `abort_frontend(ident)`:
    aborts a gone frontend's requests and returns their ids."""

    def __init__(self, router: Router, *, scheduler_id: str, engine_info: Callable[[], p.EngineInfo],
                 abort_frontend: Callable[[bytes], list[str]],
                 on_join: Callable[[bytes], None] | None = None) -> None:
        """`on_join(ident)`: a frontend said its first hello (it gets a KV snapshot, scheduler/kv_events.py)."""
        self.router = router
        self.on_join = on_join
        self.scheduler_id = scheduler_id  # one per scheduler process: a new one tells frontends to resubmit
        self.engine_info = engine_info
        self.abort_frontend = abort_frontend
        self._decoder = p.decoder_for(p.FrontendMessage)
        self._last_seen: dict[bytes, float] = {}
        self._drops: dict[bytes, int] = {}
        self._refused: set[bytes] = set()
        self._unknown_logged = float("-inf")

    def receive(self, ident: bytes, frame: bytes):
        """A known frontend's request message (AddRequest, AbortRequests, FinishOutputs,
        StatsQuery) for the loop to act on; None when the frame was handled here or ignored."""
        try:
            msg = self._decoder.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            log.error("scheduler.bad_frontend_frame", error=str(e))
            return None
        if isinstance(msg, p.FrontendHello):
            self._on_hello(ident, msg)
            return None
        if ident not in self._last_seen:
            self._on_unknown(ident, msg)
            return None
        self._last_seen[ident] = time.monotonic()
        return msg

    def _on_hello(self, ident: bytes, hello: p.FrontendHello) -> None:
        if hello.protocol_version != p.PROTOCOL_VERSION:
            self._refuse(ident, hello)
            return
        joined = ident not in self._last_seen
        self._last_seen[ident] = time.monotonic()
        self.send(ident, self._info_for(ident))
        if joined and self.on_join is not None:
            self.on_join(ident)

    def _refuse(self, ident: bytes, hello: p.FrontendHello) -> None:
        """Another protocol version: answered (every ping) with why, and otherwise not served."""
        refusal = (f"the frontend speaks protocol version {hello.protocol_version} but the scheduler speaks "
                   f"version {p.PROTOCOL_VERSION}: run the same pagedserve version in every role")
        if ident not in self._refused:  # it pings every second: log each identity once
            if len(self._refused) >= MAX_REFUSED_FRONTENDS:
                self._refused.clear()
            self._refused.add(ident)
            log.error("scheduler.frontend_refused", frontend=ident.decode(errors="replace"),
                      frontend_id=hello.frontend_id, protocol_version=hello.protocol_version,
                      expected=p.PROTOCOL_VERSION)
        self.send(ident, p.EngineInfo(ready=False, scheduler_id=self.scheduler_id, refusal=refusal))

    def _on_unknown(self, ident: bytes, msg) -> None:
        """A frame from a peer that never said hello (or was declared gone): not acted on. A
        live frontend pings every second, and its next `EngineInfo` makes it resubmit what it
        holds if this scheduler is new to it (frontend/resubmit.py), so nothing is lost."""
        now = time.monotonic()
        if now - self._unknown_logged >= UNKNOWN_PEER_LOG_EVERY_S:
            self._unknown_logged = now
            log.warning("scheduler.unknown_frontend", frontend=ident.decode(errors="replace"),
                        kind=type(msg).__name__)

    # -- sending --------------------------------------------------------------------
    def send(self, ident: bytes, msg) -> None:
        if not self.router.send(ident, msg):
            self._gone(ident, "unreachable")

    def send_deltas(self, outputs: Outputs) -> None:
        """One `EngineOutputs` per frontend, its deltas in order."""
        by_frontend: dict[bytes, list[p.TokenDelta]] = collections.defaultdict(list)
        for ident, delta in outputs:
            by_frontend[ident].append(delta)
        for ident, deltas in by_frontend.items():
            self.send(ident, p.EngineOutputs(deltas=deltas))

    def broadcast(self, msg) -> None:
        """`msg` (KV events and load) to every frontend heard from within BROADCAST_SILENCE_S: one
        paused longer would find a backlog of them ahead of everything else when it resumes (it
        sees the gap in their `seq` and asks for a snapshot instead)."""
        now = time.monotonic()
        for ident, seen in list(self._last_seen.items()):
            if now - seen <= BROADCAST_SILENCE_S:
                self.send(ident, msg)

    def announce_info(self) -> None:
        """Every known frontend gets the `EngineInfo` now, not at its next ping."""
        for ident in list(self._last_seen):
            self.send(ident, self._info_for(ident))

    def _info_for(self, ident: bytes) -> p.EngineInfo:
        return msgspec.structs.replace(self.engine_info(), scheduler_id=self.scheduler_id,
                                       frontend_drops=self._drops.get(ident, 0))

    # -- liveness -------------------------------------------------------------------
    def check_liveness(self) -> None:
        """Called every loop turn."""
        now = time.monotonic()
        for ident, seen in list(self._last_seen.items()):
            if now - seen > FRONTEND_SILENCE_S:
                self._gone(ident, "silent")

    def _gone(self, ident: bytes, cause: str) -> None:
        """Its requests can no longer be answered: free their blocks. (Their finishing deltas
        go nowhere.) Should it come back (it was only paused), `EngineInfo.frontend_drops`
        tells it to resubmit them."""
        self._last_seen.pop(ident, None)
        if len(self._drops) >= MAX_DROPPED_FRONTENDS:
            self._drops.clear()  # forgetting costs a paused frontend its requests, nothing else
        self._drops[ident] = self._drops.get(ident, 0) + 1
        request_ids = self.abort_frontend(ident)
        log.warning("scheduler.frontend_gone", frontend=ident.decode(errors="replace"), request_ids=request_ids,
                    cause=cause)
