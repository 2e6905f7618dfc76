"""The frontend: the client socket, validation, tokenization, streaming.

Owns everything about text. Holds each in-flight request's prompt ids and the
tokens generated so far (so a later change can resubmit them to a restarted
scheduler). Every bad input is answered with an `ErrorReply` to that client alone.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from frontend.detokenizer import OutputText
from frontend.engine_client import EngineClient
from frontend.resubmit import SchedulerRecovery
from frontend.tokenizer import Tokenizer
from shared import protocol as p
from shared.config import ServerConfig
from shared.ipc import bind, make_router
from shared.logging import get_logger
from shared.protocol import ErrorCode

log = get_logger()

# Client disconnects. A ROUTER reports a DEALER gone only by failing a send to it (ROUTER_MANDATORY),
# and a non-streaming request sends nothing until it completes; so every KEEPALIVE_INTERVAL_S each
# client with requests in flight gets a `KeepAlive`, and a failed send aborts its requests
# (`_client_gone`). A closed socket or a dead process closes the connection at once; a peer that
# vanished silently (host down, cable cut) is dropped by ZMTP heartbeats after CLIENT_HEARTBEAT_TIMEOUT_MS.
KEEPALIVE_INTERVAL_S = 1.0
CLIENT_HEARTBEAT_IVL_MS = 5_000
CLIENT_HEARTBEAT_TIMEOUT_MS = 20_000
# Per client connection (ZeroMQ high-water marks count messages per peer). A client that floods
# us is slowed down by TCP once CLIENT_RCVHWM of its frames wait here; others are not. A client
# that stops reading while CLIENT_SNDHWM replies wait for it is dropped like a gone one: every
# send is non-blocking, so no client can stall the frontend or grow its memory without bound.
CLIENT_RCVHWM = 10_000
CLIENT_SNDHWM = 50_000


class BadRequest(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class FrontendRequest:
    """One in-flight request. Times are `time.monotonic()` seconds, but `arrival_wall` (epoch).

    `engine_id` names it to the scheduler: the request id, or after a scheduler restart
    `<request id>#<attempt>` (frontend/resubmit.py). `held`: waiting for a ready scheduler."""

    request_id: str
    client: bytes
    stream: bool
    prompt_ids: list[int]
    params: p.SamplingParams
    outputs: list[OutputText]
    arrival: float
    finish: list[str | None] = field(default_factory=list)
    first_token_at: float | None = None
    num_preemptions: int = 0
    logprobs: list[list[p.TokenLogprobs]] | None = None  # per output, when params.logprobs is set
    prompt_logprobs: list[p.TokenLogprobs] = field(default_factory=list)  # prompt tokens 1..
    engine_id: str = ""
    priority: int = 0
    arrival_wall: float = 0.0
    held: bool = False
    attempt: int = 0

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)


class FrontendServer(SchedulerRecovery):
    def __init__(self, config: ServerConfig, tokenizer: Tokenizer, model_name: str):
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.ctx = zmq.asyncio.Context()
        self.clients = make_router(self.ctx, sndhwm=CLIENT_SNDHWM, rcvhwm=CLIENT_RCVHWM)
        self.clients.setsockopt(zmq.HEARTBEAT_IVL, CLIENT_HEARTBEAT_IVL_MS)
        self.clients.setsockopt(zmq.HEARTBEAT_TIMEOUT, CLIENT_HEARTBEAT_TIMEOUT_MS)
        self.engine = EngineClient(self.ctx, config.endpoints.scheduler_addr_for_frontends(), self._on_engine_message)
        self.info: p.EngineInfo | None = None  # the last ready EngineInfo: the model's facts
        self.latest: p.EngineInfo | None = None  # the last EngineInfo of all
        self.scheduler_id = ""  # the scheduler process answering us (a new one: resubmit)
        self.frontend_drops = 0  # EngineInfo.frontend_drops last seen (a new count: resubmit)
        self.ever_ready = False
        self.requests: dict[str, FrontendRequest] = {}  # by client request id
        self.by_engine: dict[str, FrontendRequest] = {}  # by engine id (see FrontendRequest)
        self.per_client: dict[bytes, int] = {}  # client identity -> its requests in `requests` (never 0)
        self._decoder = p.decoder_for(p.ClientMessage)
        self._encoder = msgspec.msgpack.Encoder()
        self._finished = 0
        self._rejected = 0
        self.draining = False  # SIGTERM: refuse new requests (frontend/main.py drives the drain)
        self.became_ready = asyncio.Event()  # set when `server.ready` is logged

    @property
    def ready(self) -> bool:
        """The scheduler now answering has its workers: requests go to it at once."""
        return self.latest is not None and self.latest.ready

    # -- main loop ----------------------------------------------------------
    async def run(self) -> None:
        auth = self._start_curve()
        bind(self.clients, self.config.endpoints.listen)
        log.info("frontend.listening", listen=self.config.endpoints.listen, scheduler=self.config.endpoints.scheduler_addr_for_frontends(),
                 curve=auth is not None)
        tasks = [asyncio.create_task(self.engine.run()), asyncio.create_task(self._ping_loop()),
                 asyncio.create_task(self._client_loop()), asyncio.create_task(self._keepalive_loop())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            if auth is not None:
                auth.stop()

    def _start_curve(self):
        """CURVE with a client allowlist (shared/curve.py), when configured: a ZAP handler on this
        event loop admits the public keys in curve_clients_dir. Before bind, so no client slips in."""
        if not self.config.frontend.curve_secret_key_file:
            return None
        from zmq.auth.asyncio import AsyncioAuthenticator

        from shared.curve import make_server

        if not os.path.isdir(self.config.frontend.curve_clients_dir):
            raise ValueError(f"curve_clients_dir {self.config.frontend.curve_clients_dir} is not a directory")
        make_server(self.clients, self.config.frontend.curve_secret_key_file)
        auth = AsyncioAuthenticator(self.ctx)
        auth.start()
        auth.configure_curve(domain="*", location=self.config.frontend.curve_clients_dir)
        return auth

    async def _client_loop(self) -> None:
        while True:
            frames = await self.clients.recv_multipart()
            if len(frames) != 2:  # a DEALER of ours sends exactly one frame
                if len(frames) > 2:
                    await self._reply_error(frames[0], "", ErrorCode.INVALID_REQUEST,
                                            "malformed request: one frame per message")
                continue
            client, frame = frames
            try:
                msg = self._decoder.decode(frame)
            except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec raises the latter on bad UTF-8
                await self._reply_error(client, _request_id_of(frame), ErrorCode.INVALID_REQUEST,
                                        f"malformed request: {e}")
                continue
            try:
                await self._dispatch(client, msg)
            except BadRequest as e:
                await self._reply_error(client, msg.request_id, e.code, e.message)
            except Exception as e:  # a bug must not take the frontend down for everyone
                log.exception("frontend.internal_error", request_id=msg.request_id)
                await self._reply_error(client, msg.request_id, ErrorCode.INTERNAL, f"internal error: {e!r}")

    async def _dispatch(self, client: bytes, msg: p.ClientMessage) -> None:
        if isinstance(msg, p.Generate):
            await self._generate(client, msg)
        elif isinstance(msg, p.Abort):
            req = self.requests.get(msg.request_id)
            if req is not None and req.client == client:
                if req.held:  # the scheduler has nothing to abort: finish it here
                    req.finish = [f if f is not None else p.FinishReason.ABORT.value for f in req.finish]
                    await self._complete(req, engine_finished=True)
                else:
                    await self.engine.abort([req.engine_id])
        elif isinstance(msg, p.HealthCheck):
            info = self.latest or p.EngineInfo(ready=False)
            await self._send(client, p.HealthReply(
                request_id=msg.request_id, model=self.model_name,
                status=self._health_status(info),
                workers_ready=info.workers_ready, workers_expected=info.workers_expected))
        elif isinstance(msg, p.GetStats):
            await self._send(client, p.StatsReply(request_id=msg.request_id, stats=await self._stats()))

    def _health_status(self, info: p.EngineInfo) -> str:
        """degraded: the workers are recovering from a failure; requests wait meanwhile."""
        if self.draining:
            return "draining"
        if not self.ever_ready:
            return "starting"
        return "degraded" if not info.ready or info.workers_ready < info.workers_expected else "ok"

    # -- requests -----------------------------------------------------------
    async def _generate(self, client: bytes, msg: p.Generate) -> None:
        if self.draining:
            raise BadRequest(ErrorCode.SHUTTING_DOWN, "the server is shutting down: send this request elsewhere")
        if not self.ever_ready:
            raise BadRequest(ErrorCode.UNAVAILABLE, "the server is starting: no worker is ready yet")
        if not self.ready and sum(r.held for r in self.requests.values()) >= self.config.scheduler.max_waiting:
            raise BadRequest(ErrorCode.OVERLOADED, "the scheduler is recovering and max_waiting requests "
                                                   "wait for it already: retry later")
        if msg.request_id in self.requests or msg.request_id in self.by_engine:
            raise BadRequest(ErrorCode.INVALID_REQUEST, f"request id {msg.request_id!r} is already in flight")
        if self.per_client.get(client, 0) >= self.config.frontend.max_client_requests:
            raise BadRequest(ErrorCode.OVERLOADED, f"this client has max_client_requests "
                                                   f"{self.config.frontend.max_client_requests} requests in flight: retry "
                                                   f"when some have finished")
        prompt_ids = self._prompt_ids(msg)
        self._check_lengths(prompt_ids, msg.params)
        decode = self._decoder_fn(msg.params.skip_special_tokens)
        outputs = [OutputText(decode, prompt_ids, msg.params.stop, msg.params.include_stop_str_in_output,
                              msg.params.min_tokens)
                   for _ in range(msg.params.n)]
        req = FrontendRequest(request_id=msg.request_id, client=client, stream=msg.stream, prompt_ids=prompt_ids,
                              params=msg.params, outputs=outputs, arrival=time.monotonic(),
                              finish=[None] * msg.params.n,
                              logprobs=[[] for _ in outputs] if msg.params.logprobs is not None else None,
                              engine_id=msg.request_id, priority=msg.priority, arrival_wall=time.time())
        self.requests[msg.request_id] = self.by_engine[req.engine_id] = req
        self.per_client[client] = self.per_client.get(client, 0) + 1
        if self.ready:
            await self.engine.add(req.engine_id, prompt_ids, msg.params, req.arrival_wall, msg.priority)
        else:
            self._hold(req)  # the scheduler is recovering: it gets this when it is back

    def _prompt_ids(self, msg: p.Generate) -> list[int]:
        given = [x is not None for x in (msg.prompt, msg.messages, msg.prompt_token_ids)]
        if sum(given) != 1:
            raise BadRequest(ErrorCode.INVALID_REQUEST, "give exactly one of prompt, messages, prompt_token_ids")
        vocab = self.info.vocab_size
        try:
            msg.params.validate(vocab)
        except ValueError as e:
            raise BadRequest(ErrorCode.INVALID_REQUEST, str(e)) from None
        if msg.prompt_token_ids is not None:
            ids = msg.prompt_token_ids
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise BadRequest(ErrorCode.INVALID_REQUEST,
                                 f"prompt_token_ids: {bad} is outside the vocabulary [0, {vocab})")
        else:
            try:
                if msg.prompt is not None:
                    ids = self.tokenizer.encode(msg.prompt)
                else:
                    ids = self.tokenizer.encode_chat([{"role": m.role, "content": m.content}
                                                      for m in msg.messages])
            except Exception as e:
                raise BadRequest(ErrorCode.INVALID_REQUEST, f"cannot tokenize the prompt: {e}") from None
        if not ids:
            raise BadRequest(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        return ids

    def _check_lengths(self, prompt_ids: list[int], params: p.SamplingParams) -> None:
        limit = self.info.max_model_len
        need = len(prompt_ids) + (params.max_tokens or 1)
        if need > limit:
            raise BadRequest(ErrorCode.TOO_LONG,
                             f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                             f"tokens exceeds max_model_len ({limit})")

    def _decoder_fn(self, skip_special_tokens: bool):
        tok = self.tokenizer
        return lambda ids: tok.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- engine -> clients ---------------------------------------------------
    async def _on_engine_message(self, msg: p.SchedulerMessage) -> None:
        if isinstance(msg, p.EngineOutputs):
            for delta in msg.deltas:
                await self._on_delta(delta)
        elif isinstance(msg, p.RequestRejected):
            req = self.by_engine.get(msg.request_id)
            if req is None:
                return
            if msg.code == ErrorCode.UNAVAILABLE.value:  # a restarted scheduler without workers yet
                self._hold(req)
                return
            self._forget(req)
            self._rejected += 1
            await self._reply_error(req.client, req.request_id, msg.code, msg.message)
        elif isinstance(msg, p.EngineInfo):
            await self._on_info(msg)

    def _forget(self, req: FrontendRequest) -> bool:
        """Drop `req` from both maps; False if it was gone already."""
        self.by_engine.pop(req.engine_id, None)
        if self.requests.pop(req.request_id, None) is None:
            return False
        left = self.per_client.pop(req.client) - 1
        if left:
            self.per_client[req.client] = left
        return True

    async def _on_delta(self, delta: p.TokenDelta) -> None:
        req = self.by_engine.get(delta.request_id)
        if req is None or req.finish[delta.index] is not None:
            return  # finished by a stop string, or unknown
        out = req.outputs[delta.index]
        if req.first_token_at is None and delta.token_ids:
            req.first_token_at = time.monotonic()
        out.append(delta.token_ids)
        if req.logprobs is not None:
            req.logprobs[delta.index].extend(delta.logprobs)
        if delta.prompt_logprobs:
            req.prompt_logprobs = delta.prompt_logprobs
        finish = "stop" if out.stopped else delta.finish_reason
        req.num_preemptions = max(req.num_preemptions, delta.num_preemptions)
        if req.stream:
            await self._send(req.client, p.Delta(request_id=req.request_id, index=delta.index,
                                                 text=out.release(finish is not None),
                                                 token_ids=delta.token_ids, finish_reason=finish,
                                                 logprobs=delta.logprobs if req.logprobs is not None else None))
        if finish is not None:
            req.finish[delta.index] = finish
            if delta.finish_reason is None:  # a stop string ended this output: free its blocks now
                await self.engine.stop_outputs([(req.engine_id, delta.index)])
            if req.done and req.request_id in self.requests:
                await self._complete(req, engine_finished=True)

    async def _complete(self, req: FrontendRequest, engine_finished: bool) -> None:
        if not self._forget(req):
            return  # its client went away while we streamed to it
        if not engine_finished and not req.held:
            await self.engine.abort([req.engine_id])  # free its blocks now
        now = time.monotonic()
        ttft = (req.first_token_at or now) - req.arrival
        outputs = [p.CompletionOutput(index=i, text=o.text, token_ids=o.token_ids, finish_reason=req.finish[i],
                                      logprobs=req.logprobs[i] if req.logprobs is not None else None)
                   for i, o in enumerate(req.outputs)]
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *req.prompt_logprobs]
        completion_tokens = sum(len(o.token_ids) for o in req.outputs)
        self._finished += 1
        log.info("request.finished", request_id=req.request_id, prompt_tokens=len(req.prompt_ids),
                 completion_tokens=completion_tokens, ttft_s=round(ttft, 6), latency_s=round(now - req.arrival, 6),
                 finish_reason=req.finish[0], num_preemptions=req.num_preemptions)
        await self._send(req.client, p.Completion(
            request_id=req.request_id, outputs=outputs, prompt_tokens=len(req.prompt_ids),
            completion_tokens=completion_tokens, prompt_token_ids=req.prompt_ids, ttft_s=ttft,
            latency_s=now - req.arrival, num_preemptions=req.num_preemptions, prompt_logprobs=prompt_logprobs))

    # -- drain ----------------------------------------------------------------
    async def abort_in_flight(self) -> list[str]:
        """End every request in flight now with finish_reason "abort" (a drain that ran
        out of time, or a second SIGTERM); the scheduler is told to free them. Their ids."""
        request_ids = list(self.requests)
        for req in list(self.requests.values()):
            req.finish = [f if f is not None else p.FinishReason.ABORT.value for f in req.finish]
            await self._complete(req, engine_finished=False)
        return request_ids

    def close(self, linger_ms: int) -> None:
        """Close the sockets, giving replies already queued `linger_ms` to leave."""
        self.clients.close(linger=linger_ms)
        self.engine.close()
        self.ctx.term()

    # -- plumbing -------------------------------------------------------------
    async def _stats(self) -> dict:
        stats = {"frontend_requests_in_flight": len(self.requests), "frontend_requests_finished": self._finished,
                 "frontend_requests_rejected": self._rejected}
        if self.ready:
            try:
                stats.update(await self.engine.stats())
            except asyncio.TimeoutError:
                stats["scheduler"] = "unreachable"
        return stats

    async def _send(self, client: bytes, msg: p.ServerMessage) -> None:
        await self._send_frame(client, self._encoder.encode(msg))

    async def _send_frame(self, client: bytes, frame: bytes) -> None:
        """Never blocks: a client gone (EHOSTUNREACH) or not reading (its queue at CLIENT_SNDHWM,
        EAGAIN) loses its requests, and nobody else waits for it."""
        try:
            await self.clients.send_multipart([client, frame], flags=zmq.NOBLOCK)
        except zmq.Again:
            await self._client_gone(client, "not_reading")
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            await self._client_gone(client, "unreachable")

    async def _keepalive_loop(self) -> None:
        """Probe every client with requests in flight (see KEEPALIVE_INTERVAL_S): a failed send
        lands in `_client_gone`, which aborts that client's requests."""
        keepalive = self._encoder.encode(p.KeepAlive())
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            if self.clients.closed:
                return  # shut down
            for client in {r.client for r in self.requests.values()}:
                await self._send_frame(client, keepalive)

    async def _client_gone(self, client: bytes, cause: str) -> None:
        gone = [r for r in self.requests.values() if r.client == client]
        for req in gone:
            self._forget(req)
        log.warning("frontend.client_gone", request_ids=[r.request_id for r in gone], cause=cause)
        await self.engine.abort([r.engine_id for r in gone if not r.held])

    async def _reply_error(self, client: bytes, request_id: str, code: ErrorCode | str, message: str) -> None:
        code = code.value if isinstance(code, ErrorCode) else code
        log.warning("request.error", request_id=request_id, code=code, error=message)
        await self._send(client, p.ErrorReply(request_id=request_id, code=code, message=message))


def _request_id_of(frame: bytes) -> str:
    """Best effort: the request id of a frame that failed validation, so the error reaches its caller."""
    try:
        obj = msgspec.msgpack.decode(frame)
    except Exception:  # DecodeError, or RecursionError on absurd nesting: the frame is garbage either way
        return ""
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else ""
