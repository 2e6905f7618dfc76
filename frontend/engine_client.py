"""The frontend's connection to the scheduler (a DEALER on the scheduler's ROUTER).

The frontend pings the scheduler every PING_S with `FrontendHello`; each reply is an
`EngineInfo`. The ping doubles as the heartbeat both ways (shared/protocol.py, FrontendHello).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import zmq
import zmq.asyncio

from shared import protocol as p
from shared.ipc import make_dealer
from shared.logging import get_logger

log = get_logger()

PING_S = 1.0

SchedulerHandler = Callable[[p.SchedulerMessage], Awaitable[None] | None]


class EngineClient:
    """Sends requests and aborts to the scheduler; hands every reply to `on_message`."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str, on_message: SchedulerHandler, curve=None):
        """`curve`: `shared/curve.CurveKeys` for a scheduler behind CURVE (docs/data_parallel.md)."""
        self.frontend_id = uuid.uuid4().hex[:12]
        self._sock = make_dealer(ctx, identity=f"fe-{self.frontend_id}".encode())
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(addr)
        self._addr = addr
        self._on_message = on_message
        self._decoder = p.decoder_for(p.SchedulerMessage)
        self._encoder = msgspec.msgpack.Encoder()
        self._pending_stats: dict[str, asyncio.Future] = {}

    async def send(self, msg: p.FrontendMessage) -> None:
        await self._sock.send(self._encoder.encode(msg))

    async def hello(self) -> None:
        await self.send(p.FrontendHello(frontend_id=self.frontend_id, protocol_version=p.PROTOCOL_VERSION))

    async def ping_loop(self) -> None:
        """Say hello every PING_S, for as long as the frontend runs."""
        while True:
            await self.hello()
            await asyncio.sleep(PING_S)

    async def add(self, request_id: str, prompt_ids: list[int], params: p.SamplingParams,
                  arrival: float, priority: int, trace_id: str = "") -> None:
        """`trace_id`: the request's W3C trace id ("" for none), for the scheduler's events."""
        await self.send(p.AddRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=params,
                                     arrival_time=arrival, priority=priority, trace_id=trace_id))

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            await self.send(p.AbortRequests(request_ids=request_ids))

    async def finish_outputs(self, outputs: list[tuple[str, int]]) -> None:
        """Finish single outputs (engine request id, output index) that a stop string ended."""
        if outputs:
            await self.send(p.FinishOutputs(outputs=outputs))

    async def stats(self, timeout: float = 5.0) -> dict:
        qid = uuid.uuid4().hex
        fut = self._pending_stats[qid] = asyncio.get_running_loop().create_future()
        try:
            await self.send(p.StatsQuery(query_id=qid))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending_stats.pop(qid, None)

    async def run(self) -> None:
        """Receive loop: never returns while the frontend runs."""
        while True:
            frame = await self._sock.recv()
            try:
                msg = self._decoder.decode(frame)
            except (msgspec.DecodeError, UnicodeDecodeError) as e:
                log.error("frontend.bad_scheduler_frame", error=str(e), bytes=len(frame))
                continue
            if isinstance(msg, p.StatsResult):
                fut = self._pending_stats.get(msg.query_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg.stats)
                continue
            result = self._on_message(msg)
            if result is not None:
                await result

    def close(self) -> None:
        self._sock.close(linger=0)
