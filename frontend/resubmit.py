"""The frontend's side of a scheduler restart: hold in-flight requests, resubmit them.

Each `EngineInfo` (the reply to the frontend's ping, frontend/engine_client.py) carries the
scheduler process's `scheduler_id`. A new id means the scheduler restarted and everything it
held is gone, so every request in flight is *held* (clients see a pause: the KeepAlives go
on), and once the new scheduler is ready (its workers joined) each held request is
resubmitted: its prompt, the tokens each output already streamed
(`AddRequest.output_token_ids`, which the scheduler continues after, counting them towards
max_tokens and the seeded token index), the outputs already finished, its priority and
original arrival time.

A resubmission goes under a new engine request id (`<id>#<attempt>`), and the old one is
aborted first: an `AddRequest` sent while the scheduler was down may reach the new one from
the socket's queue, and its tokens must not be mistaken for the resubmission's. Deltas for an
engine id no longer in the table are dropped.

The same happens when the scheduler says it dropped this frontend (`EngineInfo.frontend_drops`
grew): the frontend was paused (SIGSTOP, a stalled host) past the scheduler's patience, so its
requests were aborted there, but the frontend still holds their clients and tokens.

New requests keep being accepted once the server was ready once: while the scheduler is away
(or has no workers yet) they are held too, at most max_waiting (frontend/intake.py). A
`RequestRejected` with code `unavailable` (a scheduler with no workers yet) also holds the
request instead of failing it.
"""

from __future__ import annotations

from frontend.engine_client import EngineClient
from frontend.metrics_trace import trace_id_of
from frontend.requests import FrontendRequest, RequestTable
from shared import protocol as p
from shared.logging import get_logger

log = get_logger()


class Resubmitter:
    """Tracks which scheduler process answers, and holds and resubmits requests across a change.

    Owns `scheduler_id` and `frontend_drops` (as last seen); reads and updates the requests in
    `table` (their `held` flag and engine ids) and sends through `engine`."""

    def __init__(self, engine: EngineClient, table: RequestTable, owns=None) -> None:
        """`owns(req)`: whether `req` is on this scheduler (several replicas: frontend/replicas.py,
        each with its own Resubmitter); every request by default. `resubmit_held` sends every held
        request through `engine`, which picks its replica."""
        self._engine = engine
        self._table = table
        self._owns = owns or (lambda req: True)
        self.scheduler_id = ""  # the scheduler process answering us ("" before the first reply)
        self.frontend_drops = 0  # EngineInfo.frontend_drops last seen

    def notice(self, msg: p.EngineInfo) -> None:
        """Hold every request in flight if `msg` comes from a new scheduler process, or says
        this one dropped us; remember who answers."""
        if self.scheduler_id and msg.scheduler_id != self.scheduler_id:
            self._hold_all()
            log.warning("frontend.scheduler_restarted", scheduler_id=msg.scheduler_id,
                        requests_held=[req.request_id for req in self._table if req.held])
        elif self.scheduler_id and msg.frontend_drops != self.frontend_drops:
            # We were paused long enough for the scheduler to abort our requests: they are ours still.
            self._hold_all()
            log.warning("frontend.dropped_by_scheduler", drops=msg.frontend_drops,
                        requests_held=[req.request_id for req in self._table if req.held])
        self.scheduler_id = msg.scheduler_id
        self.frontend_drops = msg.frontend_drops

    def _hold_all(self) -> None:
        for req in self._table:
            if self._owns(req):
                req.held = True

    @staticmethod
    def hold(req: FrontendRequest) -> None:
        """Keep `req` for the next ready scheduler (none is ready, or it was rejected as unavailable)."""
        req.held = True

    def _next_engine_id(self, req: FrontendRequest) -> str:
        """A fresh engine request id for `req`'s next submission."""
        while True:
            req.attempt += 1
            engine_id = f"{req.request_id}#{req.attempt}"
            if not self._table.id_in_use(engine_id):
                return engine_id

    async def resubmit_held(self) -> None:
        """Send every held request to the (ready) scheduler, with the tokens it has so far."""
        held = self._table.held()
        if not held:
            return
        await self._engine.abort([req.engine_id for req in held])  # stale copies, should one arrive
        for req in held:
            self._table.rename(req, self._next_engine_id(req))
            req.held = False
            tokens = [out.token_ids for out in req.outputs]
            await self._engine.send(p.AddRequest(
                request_id=req.engine_id, prompt_token_ids=req.prompt_ids, params=req.params,
                arrival_time=req.arrival_wall, priority=req.priority,
                output_token_ids=tokens if any(tokens) else [],
                finished_outputs=[i for i, f in enumerate(req.finish) if f is not None],
                trace_id=trace_id_of(req.traceparent)))
        log.info("frontend.resubmitted", scheduler_id=self.scheduler_id,
                 request_ids=[req.request_id for req in held],
                 tokens_kept=sum(len(out.token_ids) for req in held for out in req.outputs))
