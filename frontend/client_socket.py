"""The frontend's client endpoint: a ROUTER that never blocks on a client and notices gone ones.

Client disconnects. A ROUTER reports a DEALER gone only by failing a send to it
(ROUTER_MANDATORY), and a non-streaming request sends nothing until it completes; so every
KEEPALIVE_INTERVAL_S each client with requests in flight gets a `KeepAlive`, and a failed send
reports that client gone (`on_gone`, which aborts its requests). A closed socket or a dead
process closes the connection at once; a peer that vanished silently (host down, cable cut) is
dropped by ZMTP heartbeats after CLIENT_HEARTBEAT_TIMEOUT_MS.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import msgspec
import zmq
import zmq.asyncio

from shared import protocol as p
from shared.config import FrontendConfig
from shared.ipc import bind, make_router
from shared.logging import get_logger
from shared.protocol import ErrorCode

log = get_logger()

KEEPALIVE_INTERVAL_S = 1.0
CLIENT_HEARTBEAT_IVL_MS = 5_000
CLIENT_HEARTBEAT_TIMEOUT_MS = 20_000
# Per client connection (ZeroMQ high-water marks count messages per peer). A client that floods
# us is slowed down by TCP once CLIENT_RCVHWM of its frames wait here; others are not. A client
# that stops reading while CLIENT_SNDHWM replies wait for it is dropped like a gone one: every
# send is non-blocking, so no client can stall the frontend or grow its memory without bound.
CLIENT_RCVHWM = 10_000
CLIENT_SNDHWM = 50_000

# (client identity, cause): cause is "unreachable" (disconnected) or "not_reading" (queue full).
GoneHandler = Callable[[bytes, str], Awaitable[None]]


class ClientSocket:
    """The ROUTER clients' DEALERs connect to, with its CURVE authenticator when configured.

    Owns the socket and the authenticator; knows nothing of requests. Sends are non-blocking:
    a send that cannot be queued reports the client to `on_gone` instead of waiting."""

    def __init__(self, ctx: zmq.asyncio.Context, on_gone: GoneHandler, *,
                 sndhwm: int = CLIENT_SNDHWM, rcvhwm: int = CLIENT_RCVHWM) -> None:
        self._ctx = ctx
        self._on_gone = on_gone
        self.sock = make_router(ctx, sndhwm=sndhwm, rcvhwm=rcvhwm)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, CLIENT_HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, CLIENT_HEARTBEAT_TIMEOUT_MS)
        self._encoder = msgspec.msgpack.Encoder()
        self._auth = None

    @property
    def curve(self) -> bool:
        return self._auth is not None

    def listen(self, addr: str, frontend: FrontendConfig) -> None:
        """Start CURVE when configured (before bind, so no client slips in unauthenticated), then bind."""
        if frontend.curve_secret_key_file:
            self._start_curve(frontend.curve_secret_key_file, frontend.curve_clients_dir)
        bind(self.sock, addr)

    def _start_curve(self, secret_key_file: str, clients_dir: str) -> None:
        """CURVE with a client allowlist (shared/curve.py): a ZAP handler on this event loop
        admits the public keys in `clients_dir`."""
        from zmq.auth.asyncio import AsyncioAuthenticator

        from shared.curve import make_server

        if not os.path.isdir(clients_dir):
            raise ValueError(f"curve_clients_dir {clients_dir} is not a directory")
        make_server(self.sock, secret_key_file)
        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=clients_dir)

    async def recv(self) -> list[bytes]:
        """The next message's frames: [client identity, *what it sent]."""
        return await self.sock.recv_multipart()

    async def send(self, client: bytes, msg: p.ServerMessage) -> None:
        await self.send_frame(client, self._encoder.encode(msg))

    async def send_frame(self, client: bytes, frame: bytes) -> None:
        """Never blocks: a client gone (EHOSTUNREACH) or not reading (its queue at the send
        high-water mark, EAGAIN) is reported to `on_gone`, and nobody else waits for it."""
        try:
            await self.sock.send_multipart([client, frame], flags=zmq.NOBLOCK)
        except zmq.Again:
            await self._on_gone(client, "not_reading")
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            await self._on_gone(client, "unreachable")

    async def reply_error(self, client: bytes, request_id: str, code: ErrorCode | str, message: str,
                          trace_id: str = "") -> None:
        """The one way a client learns its request failed (logged as `request.error`)."""
        code = code.value if isinstance(code, ErrorCode) else code
        log.warning("request.error", request_id=request_id, code=code, error=message,
                    **({"trace_id": trace_id} if trace_id else {}))
        await self.send(client, p.ErrorReply(request_id=request_id, code=code, message=message))

    async def keepalive_loop(self, clients_in_flight: Callable[[], list[bytes]]) -> None:
        """Probe every client with requests in flight each KEEPALIVE_INTERVAL_S: a failed send
        reports it to `on_gone`. Returns once the socket is closed."""
        keepalive = self._encoder.encode(p.KeepAlive())
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            if self.sock.closed:
                return
            for client in clients_in_flight():
                await self.send_frame(client, keepalive)

    def close(self, linger_ms: int) -> None:
        """Stop the authenticator and close, giving replies already queued `linger_ms` to leave."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.sock.close(linger=linger_ms)


def request_id_of(frame: bytes) -> str:
    """Best effort: the request id of a frame that failed validation, so the error reaches its caller."""
    try:
        obj = msgspec.msgpack.decode(frame)
    except Exception:  # DecodeError, or RecursionError on absurd nesting: the frame is garbage either way
        return ""
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else ""
