"""The frontend process's loop: client messages in, scheduler messages in, composed from parts.

Owns everything about text (frontend/intake.py, frontend/streams.py). Holds each in-flight
request's prompt ids and the tokens generated so far, so it can resubmit them to a restarted
scheduler (frontend/resubmit.py). Every bad input is answered with an `ErrorReply` to that
client alone.

The parts, each owning its state:
  RequestTable (frontend/requests.py)      the requests in flight, by request id and engine id
  ClientSocket (frontend/client_socket.py) the clients' ROUTER: CURVE, keepalives, gone clients
  ReplicaSet   (frontend/replicas.py)      the engine replicas (one scheduler each; usually one):
                                           per replica an EngineClient (DEALER: pings, requests,
                                           aborts), EngineStatus, Resubmitter, PrefixIndex; routing
  FleetStatus  (frontend/fleet_status.py)  the replicas' EngineInfos together: ready, limits, health
  Intake       (frontend/intake.py)        Generate -> validated, tokenized request
  ResponseStreamer (frontend/streams.py)   token deltas -> Deltas and Completions
  ReplyRouter  (frontend/http/replies.py)  replies to a ZeroMQ client, or to an HTTP request's queue
  HttpListener (frontend/http/)            the OpenAI-compatible HTTP API, when --http-listen is set

An HTTP request is submitted exactly as a ZeroMQ `Generate` is (`submit`), under a client
identity of its own; replies reach it through the ReplyRouter.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import zmq.asyncio

from frontend.client_socket import ClientSocket, request_id_of
from frontend.failover import Failover
from frontend.fleet_status import FleetStatus
from frontend.http.replies import ReplyRouter, is_http_client
from frontend.intake import Intake
from frontend.metrics_endpoint import frontend_metrics, serve_metrics
from frontend.metrics_trace import message_trace_id, trace_id_of
from frontend.replicas import Replica, ReplicaSet
from frontend.requests import RequestTable
from frontend.streams import ResponseStreamer
from frontend.tokenizer import Tokenizer
from shared import protocol as p
from shared.config import ServerConfig
from shared.drain import Drain
from shared.logging import get_logger
from shared.protocol import ErrorCode
from shared.validation import Rejected

log = get_logger()


class FrontendServer:
    """Composes the parts above and routes messages between them. Owns the ZeroMQ context and
    the `rejected` count (requests the scheduler rejected). `drain` is read, never driven: the
    process's main (frontend/main.py) drives it."""

    def __init__(self, config: ServerConfig, tokenizer: Tokenizer, model_name: str, drain: Drain, *,
                 http_keys=None) -> None:
        """`http_keys`: the HTTP API's keys (frontend/http/auth.py `keys_for`, checked before the
        tokenizer loads); read from the config when None."""
        self.config = config
        self.model_name = model_name
        self.drain = drain
        self.ctx = zmq.asyncio.Context()
        self.table = RequestTable()
        self.clients = ClientSocket(self.ctx, on_gone=self._client_gone)
        self.engine = ReplicaSet(self.ctx, config, self.table, self._on_replica_message)
        self.status = FleetStatus(self.engine.replicas)
        self.resubmitter = self.engine.replicas[0].resubmitter  # any one resubmits every held request
        self.failover = Failover(self.engine, self.status, self.resubmitter, config.scheduler.stats_interval_s)
        self.intake = Intake(config, tokenizer, self.table, self.status, drain)
        self.replies = ReplyRouter(self.clients)
        self.metrics = frontend_metrics(config, model_name, self.engine, self.status)
        self.streamer = ResponseStreamer(self.table, self.replies, self.engine, observer=self.metrics)
        self.http = self._http_listener(tokenizer, http_keys) if config.frontend.http_listen else None
        self._decoder = p.decoder_for(p.ClientMessage)
        self.rejected = 0
        self.tokenizer = tokenizer
        self._tokenizer_sent_to: set[str] = set()  # the scheduler ids that have our TokenizerInfo

    # -- main loop ----------------------------------------------------------
    async def run(self) -> None:
        listen = self.config.endpoints.listen
        self.clients.listen(listen, self.config.frontend)
        log.info("frontend.listening", listen=listen, scheduler=self.engine.replicas[0].addr,
                 engines=[r.addr for r in self.engine.replicas], curve=self.clients.curve)
        if self.http is not None:
            self.http.bind()
        tasks = [asyncio.create_task(self.engine.run()),
                 asyncio.create_task(self._client_loop()), asyncio.create_task(self.failover.liveness_loop()),
                 asyncio.create_task(self.clients.keepalive_loop(
                     lambda: ReplyRouter.socket_clients(self.table.clients())))]
        if self.http is not None:
            tasks.append(asyncio.create_task(self.http.serve()))
        if self.config.frontend.metrics_listen:
            tasks.append(asyncio.create_task(serve_metrics(self.metrics, self.config.frontend.metrics_listen)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            if self.http is not None:  # let the last HTTP responses (a drain's) be written
                await self.http.stop()
            for t in tasks:
                t.cancel()

    async def _client_loop(self) -> None:
        while True:
            frames = await self.clients.recv()
            if len(frames) != 2:  # a DEALER of ours sends exactly one frame
                if len(frames) > 2:
                    await self.clients.reply_error(frames[0], "", ErrorCode.INVALID_REQUEST,
                                                   "malformed request: one frame per message")
                continue
            client, frame = frames
            if is_http_client(client):  # a peer that chose an HTTP identity: it could read their replies
                await self.clients.reply_error(client, request_id_of(frame), ErrorCode.INVALID_REQUEST,
                                               "this routing id is reserved: let ZeroMQ choose yours")
                continue
            try:
                msg = self._decoder.decode(frame)
            except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec raises the latter on bad UTF-8
                await self.clients.reply_error(client, request_id_of(frame), ErrorCode.INVALID_REQUEST,
                                               f"malformed request: {e}")
                continue
            try:
                await self._dispatch(client, msg)
            except Rejected as e:
                await self.clients.reply_error(client, msg.request_id, e.code, e.message, message_trace_id(msg))
            except Exception as e:  # a bug must not take the frontend down for everyone
                log.exception("frontend.internal_error", request_id=msg.request_id)
                await self.clients.reply_error(client, msg.request_id, ErrorCode.INTERNAL, f"internal error: {e!r}")

    async def _dispatch(self, client: bytes, msg: p.ClientMessage) -> None:
        if isinstance(msg, p.Generate):
            await self.submit(client, msg)
        elif isinstance(msg, p.Abort):
            await self.abort_request(client, msg.request_id)
        elif isinstance(msg, p.HealthCheck):
            info = self.status.latest or p.EngineInfo(ready=False)
            await self.clients.send(client, p.HealthReply(
                request_id=msg.request_id, model=self.model_name, status=self.status.health(self.drain.draining),
                workers_ready=info.workers_ready, workers_expected=info.workers_expected))
        elif isinstance(msg, p.GetStats):
            await self.clients.send(client, p.StatsReply(request_id=msg.request_id, stats=await self._stats()))

    async def submit(self, client: bytes, msg: p.Generate) -> None:
        """Admit `msg` (raises `Rejected`) and send it to the scheduler, or hold it for one."""
        req = self.intake.admit(client, msg)
        self.table.add(req)
        if self.status.ready:
            await self.engine.add(req.engine_id, req.prompt_ids, req.params, req.arrival_wall, req.priority,
                                  trace_id=trace_id_of(req.traceparent))
        else:
            self.resubmitter.hold(req)  # the scheduler is recovering: it gets this when it is back

    # -- scheduler -> clients ----------------------------------------------------
    async def _on_engine_message(self, msg: p.SchedulerMessage) -> None:
        """A message from the first (or only) replica."""
        await self._on_replica_message(self.engine.replicas[0], msg)

    async def _on_replica_message(self, replica: Replica, msg: p.SchedulerMessage) -> None:
        self.engine.heard(replica)
        if isinstance(msg, p.KvEvents):
            await self.failover.on_kv_events(replica, msg)
        elif isinstance(msg, p.EngineOutputs):
            moved = False
            for delta in msg.deltas:
                if self.failover.drained_away(replica, delta):  # a drain's deadline: not the client's abort
                    moved = True
                    continue
                await self.streamer.on_delta(delta)
            if moved:
                await self.failover.resubmit_if_ready()
        elif isinstance(msg, p.RequestRejected):
            req = self.table.by_engine_id(msg.request_id)
            if req is None:
                return
            if self.failover.refused(replica, msg.code):  # a scheduler without workers yet, or draining
                self.resubmitter.hold(req)
                await self.failover.resubmit_if_ready()
                return
            self.table.forget(req)
            self.rejected += 1
            await self.replies.reply_error(req.client, req.request_id, msg.code, msg.message,
                                           trace_id_of(req.traceparent))
        elif isinstance(msg, p.EngineInfo):
            was_healthy = replica.healthy
            replica.resubmitter.notice(msg)
            replica.status.update(msg)
            self.status.refresh()
            if msg.ready and msg.needs_tokenizer and msg.scheduler_id not in self._tokenizer_sent_to:
                # Once per scheduler process, before any resubmission: it compiles grammars with it.
                self._tokenizer_sent_to.add(msg.scheduler_id)
                await replica.client.send(p.TokenizerInfo(self.tokenizer.serialized()))
            if was_healthy and not replica.healthy:
                self.failover.replica_down(replica, "workers_lost" if msg.ready else "not_ready")
            await self.failover.resubmit_if_ready()

    async def abort_request(self, client: bytes, request_id: str) -> None:
        """`client` gives up `request_id` (an `Abort`, or an HTTP client gone): it ends with
        finish_reason "abort" and the scheduler frees its blocks. A request of another client,
        or one already finished, is left alone."""
        req = self.table.get(request_id)
        if req is not None and req.client == client:
            if req.held:  # the scheduler has nothing to abort: finish it here
                await self.streamer.abort(req)
            else:  # its abort deltas complete it
                req.aborting = True
                await self.engine.abort([req.engine_id])

    async def _client_gone(self, client: bytes, cause: str) -> None:
        """`client` can no longer be reached (frontend/client_socket.py): drop its requests."""
        gone = self.table.of_client(client)
        for req in gone:
            self.table.forget(req)
        log.warning("frontend.client_gone", request_ids=[r.request_id for r in gone], cause=cause)
        await self.engine.abort([r.engine_id for r in gone if not r.held])

    def _http_listener(self, tokenizer: Tokenizer, keys):
        """The HTTP API's listener. Its /metrics renders `render_metrics` (the frontend's
        `FrontendMetrics.render`, frontend/metrics.py, once this server holds one)."""
        # Imported here: uvicorn and starlette load only when HTTP is on.
        from frontend.http.auth import keys_for
        from frontend.http.setup import make_listener

        return make_listener(self.config, keys=keys if keys is not None else keys_for(self.config.frontend),
                             replies=self.replies, submit=self.submit, abort=self.abort_request,
                             status=self.status, drain=self.drain, engine_stats=self.engine.stats,
                             model_name=self.model_name,
                             decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                             render_metrics=self.metrics.render)

    # -- drain ----------------------------------------------------------------
    async def abort_in_flight(self) -> list[str]:
        """End every request in flight now with finish_reason "abort" (a drain that ran
        out of time, or a second SIGTERM); the scheduler is told to free them. Their ids."""
        in_flight = list(self.table)
        for req in in_flight:
            await self.streamer.abort(req)
        return [req.request_id for req in in_flight]

    def close(self, linger_ms: int) -> None:
        """Close the sockets, giving replies already queued `linger_ms` to leave."""
        self.clients.close(linger_ms)
        self.engine.close()
        self.ctx.term()

    async def _stats(self) -> dict:
        stats = {"frontend_requests_in_flight": len(self.table), "frontend_requests_finished": self.streamer.finished,
                 "frontend_requests_rejected": self.rejected,
                 # This process's CPU seconds (user + system, all threads): the bench divides its
                 # change over a run by the tokens generated (bench/http_vs_zmq.py).
                 "frontend_cpu_s": round(time.process_time(), 6)}
        if self.status.ready:
            try:
                stats.update(await self.engine.stats())
            except TimeoutError:
                stats["scheduler"] = "unreachable"
        return stats
