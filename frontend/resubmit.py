"""The frontend's side of a scheduler restart: hold in-flight requests, resubmit them.

A mixin of `FrontendServer` (frontend/server.py). The frontend pings the
scheduler every PING_S with `FrontendHello`; each reply is an `EngineInfo`
carrying the scheduler process's `scheduler_id`. A new id means the scheduler
restarted and everything it held is gone, so every request in flight is *held*
(clients see a pause: the KeepAlives go on), and once the new scheduler is ready
(its workers joined) each held request is resubmitted: its prompt, the tokens
each output already streamed (`AddRequest.output_token_ids`, which the scheduler
continues after, counting them towards max_tokens and the seeded token index),
the outputs already finished, its priority and original arrival time.

A resubmission goes under a new engine request id (`<id>#<attempt>`), and the old
one is aborted first: an `AddRequest` sent while the scheduler was down may reach
the new one from the socket's queue, and its tokens must not be mistaken for the
resubmission's. Deltas for an engine id no longer mapped are dropped.

The same happens when the scheduler says it dropped this frontend
(`EngineInfo.frontend_drops` grew): the frontend was paused (SIGSTOP, a stalled
host) past the scheduler's patience, so its requests were aborted there, but the
frontend still holds their clients and tokens.

New requests keep being accepted once the server was ready once: while the
scheduler is away (or has no workers yet) they are held too, at most max_waiting.
A `RequestRejected` with code `unavailable` (a scheduler with no workers yet) also
holds the request instead of failing it.
"""

from __future__ import annotations

import asyncio

from shared import protocol as p
from shared.logging import get_logger

log = get_logger()

PING_S = 1.0


class SchedulerRecovery:
    """Needs from the server: requests, by_engine, engine, info, latest, scheduler_id,
    ever_ready, became_ready, config."""

    async def _ping_loop(self) -> None:
        while True:
            await self.engine.hello()
            await asyncio.sleep(PING_S)

    async def _on_info(self, msg: p.EngineInfo) -> None:
        if self.scheduler_id and msg.scheduler_id != self.scheduler_id:
            self._hold_all()
            log.warning("frontend.scheduler_restarted", scheduler_id=msg.scheduler_id,
                        requests_held=[req.request_id for req in self.requests.values()])
        elif self.scheduler_id and msg.frontend_drops != self.frontend_drops:
            # We were paused long enough for the scheduler to abort our requests: they are ours still.
            self._hold_all()
            log.warning("frontend.dropped_by_scheduler", drops=msg.frontend_drops,
                        requests_held=[req.request_id for req in self.requests.values()])
        self.scheduler_id = msg.scheduler_id
        self.frontend_drops = msg.frontend_drops
        self.latest = msg
        if not msg.ready:
            return
        self.info = msg  # the model's facts, for validation; kept while a new scheduler starts
        if not self.ever_ready:
            self.ever_ready = True
            log.info("server.ready", listen=self.config.endpoints.listen, model=msg.model, max_model_len=msg.max_model_len,
                     kv_blocks=msg.num_device_blocks, block_size=msg.block_size)
            self.became_ready.set()
        if any(req.held for req in self.requests.values()):
            await self._resubmit()

    def _hold_all(self) -> None:
        for req in self.requests.values():
            req.held = True

    def _hold(self, req) -> None:
        """Keep `req` for the next ready scheduler (it was rejected as unavailable)."""
        req.held = True

    def _engine_id(self, req) -> str:
        """A fresh engine request id for `req`'s next submission."""
        while True:
            req.attempt += 1
            engine_id = f"{req.request_id}#{req.attempt}"
            if engine_id not in self.by_engine:
                return engine_id

    async def _resubmit(self) -> None:
        held = [req for req in self.requests.values() if req.held]
        await self.engine.abort([req.engine_id for req in held])  # stale copies, should one arrive
        for req in held:
            self.by_engine.pop(req.engine_id, None)
            req.engine_id = self._engine_id(req)
            req.held = False
            self.by_engine[req.engine_id] = req
            tokens = [out.token_ids for out in req.outputs]
            await self.engine.send(p.AddRequest(
                request_id=req.engine_id, prompt_token_ids=req.prompt_ids, params=req.params,
                arrival_time=req.arrival_wall, priority=req.priority,
                output_token_ids=tokens if any(tokens) else [],
                finished_outputs=[i for i, f in enumerate(req.finish) if f is not None]))
        log.info("frontend.resubmitted", scheduler_id=self.scheduler_id,
                 request_ids=[req.request_id for req in held],
                 tokens_kept=sum(len(out.token_ids) for req in held for out in req.outputs))
