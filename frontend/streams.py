"""Engine token deltas -> client `Delta`s and `Completion`s.

The scheduler reports tokens by engine request id (frontend/requests.py); this detokenizes
them, finds stop strings, streams text to clients that asked for a stream, and ends each
request with one `Completion` (or nothing, if its client went away meanwhile).
"""

from __future__ import annotations

import time

from frontend.engine_client import EngineClient
from frontend.http.replies import ReplyRouter
from frontend.metrics_trace import trace_fields
from frontend.requests import FrontendRequest, RequestTable
from shared import protocol as p
from shared.logging import get_logger

log = get_logger()


class _NoObserver:
    """`ResponseStreamer`'s observer when none is given (the real one: frontend/metrics.py)."""

    def on_first_token(self, req: FrontendRequest, delta: p.TokenDelta) -> None: ...
    def on_tokens(self, num_tokens: int, gap_s: float | None) -> None: ...
    def on_finished(self, req: FrontendRequest, completion_tokens: int, now: float) -> None: ...


class ResponseStreamer:
    """Answers clients from the scheduler's deltas. Owns `finished`: requests completed since start."""

    def __init__(self, table: RequestTable, clients: ReplyRouter, engine: EngineClient, observer=None) -> None:
        self._table = table
        self._clients = clients
        self._engine = engine
        self.finished = 0
        self.observer = observer or _NoObserver()  # metrics: FrontendMetrics (frontend/metrics.py)

    async def on_delta(self, delta: p.TokenDelta) -> None:
        req = self._table.by_engine_id(delta.request_id)
        if req is None or req.finish[delta.index] is not None:
            return  # finished by a stop string, or unknown (gone, or a stale engine id)
        out = req.outputs[delta.index]
        taken = out.append(delta.token_ids)  # fewer when a stop string ends the output inside the delta
        token_ids, logprobs = delta.token_ids[:taken], delta.logprobs[:taken]
        if token_ids:
            now = time.monotonic()
            if req.first_token_at is None:
                req.first_token_at = now
                self.observer.on_first_token(req, delta)
            previous = req.last_token_at.get(delta.index)
            req.last_token_at[delta.index] = now
            self.observer.on_tokens(len(token_ids), None if previous is None else now - previous)
        if req.logprobs is not None:
            req.logprobs[delta.index].extend(logprobs)
        if delta.prompt_logprobs:
            req.prompt_logprobs = delta.prompt_logprobs
        if delta.beam_score is not None:  # a beam-search hypothesis, whole on this delta
            req.beam_scores[delta.index] = (delta.cumulative_logprob, delta.beam_score)
            req.beam_stats.update(delta.beam_stats)
        finish = "stop" if out.stopped else delta.finish_reason
        req.num_preemptions = max(req.num_preemptions, delta.num_preemptions)
        if delta.spec_proposed:  # totals so far (scheduler/token_outcome.py)
            req.spec[delta.index] = (delta.spec_proposed, delta.spec_accepted)
        if req.stream:
            await self._clients.send(req.client, p.Delta(
                request_id=req.request_id, index=delta.index, text=out.release(finish is not None),
                token_ids=token_ids, finish_reason=finish,
                logprobs=logprobs if req.logprobs is not None else None))
        if finish is not None:
            req.finish[delta.index] = finish
            if delta.finish_reason is None:  # a stop string ended this output: free its blocks now
                await self._engine.finish_outputs([(req.engine_id, delta.index)])
            if req.done and req in self._table:  # the send above may have found its client gone
                await self.complete(req, engine_finished=True)

    async def abort(self, req: FrontendRequest) -> None:
        """End `req` now: its unfinished outputs with finish_reason "abort"; the scheduler frees it."""
        req.finish_unfinished(p.FinishReason.ABORT.value)
        await self.complete(req, engine_finished=False)

    async def complete(self, req: FrontendRequest, engine_finished: bool) -> None:
        """Forget `req` and send its `Completion`. `engine_finished`: the scheduler holds nothing
        of it any more; otherwise (and unless held, unknown there) it is told to abort it."""
        if not self._table.forget(req):
            return  # its client went away while we streamed to it
        if not engine_finished and not req.held:
            await self._engine.abort([req.engine_id])  # free its blocks now
        now = time.monotonic()
        ttft = (req.first_token_at or now) - req.arrival
        outputs = [p.CompletionOutput(index=i, text=o.text, token_ids=o.token_ids, finish_reason=req.finish[i],
                                      logprobs=req.logprobs[i] if req.logprobs is not None else None,
                                      cumulative_logprob=req.beam_scores.get(i, (None, None))[0],
                                      beam_score=req.beam_scores.get(i, (None, None))[1])
                   for i, o in enumerate(req.outputs)]
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *req.prompt_logprobs]
        completion_tokens = sum(len(o.token_ids) for o in req.outputs)
        self.finished += 1
        log.info("request.finished", request_id=req.request_id, prompt_tokens=len(req.prompt_ids),
                 completion_tokens=completion_tokens, ttft_s=round(ttft, 6), latency_s=round(now - req.arrival, 6),
                 finish_reason=req.finish[0], num_preemptions=req.num_preemptions, **trace_fields(req),
                 **req.beam_stats, **req.spec_fields())
        self.observer.on_finished(req, completion_tokens, now)
        await self._clients.send(req.client, p.Completion(
            request_id=req.request_id, outputs=outputs, prompt_tokens=len(req.prompt_ids),
            completion_tokens=completion_tokens, prompt_token_ids=req.prompt_ids, ttft_s=ttft,
            latency_s=now - req.arrival, num_preemptions=req.num_preemptions, prompt_logprobs=prompt_logprobs))
