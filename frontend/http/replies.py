"""Where a reply goes: a ZeroMQ client's socket, or the queue of the HTTP request that asked.

An HTTP request becomes the same `FrontendRequest` a ZeroMQ client's `Generate` does, under a
client identity of its own (`b"\\x00http-<n>"`, one per HTTP request, never reused in a process).
Everything that answers clients (ResponseStreamer, the server's rejections) sends through
`ReplyRouter.send`; for an HTTP identity that is one `put_nowait` on the request's queue, which
its handler (frontend/http/exchange.py) turns into an SSE event or the final JSON body.
"""

from __future__ import annotations

import asyncio
import itertools

from frontend.client_socket import ClientSocket
from shared import protocol as p
from shared.logging import get_logger
from shared.protocol import ErrorCode

log = get_logger()

# A leading zero byte, as libzmq's own identities (5 bytes: 0x00 and a 32-bit number), so it never
# equals one of them. libzmq does not stop a peer from choosing it as its routing id: the server
# refuses ZeroMQ frames from such identities (frontend/server.py), so no ZeroMQ client can read
# an HTTP request's replies or abort it.
HTTP_CLIENT_PREFIX = b"\x00http-"


def is_http_client(client: bytes) -> bool:
    """True for the identities `ReplyRouter.open` makes (see HTTP_CLIENT_PREFIX)."""
    return client.startswith(HTTP_CLIENT_PREFIX)


class ReplyRouter:
    """Sends replies to ZeroMQ clients through `sockets`, and to HTTP requests through the queue
    each registered. Owns the queues by identity.

    Invariant: an identity is registered from just before its request is submitted until its
    handler is done with it; a reply for an identity not registered (its HTTP client left, and
    the request was aborted) is dropped, as a ZeroMQ reply to a gone client is."""

    def __init__(self, sockets: ClientSocket) -> None:
        self._sockets = sockets
        self._queues: dict[bytes, asyncio.Queue] = {}
        self._numbers = itertools.count(1)

    def open(self) -> tuple[bytes, asyncio.Queue]:
        """A new HTTP identity and the queue its replies will arrive on (unbounded: a request's
        replies are bounded by its max_tokens, and the handler drains them as fast as its
        client reads)."""
        client = HTTP_CLIENT_PREFIX + str(next(self._numbers)).encode()
        queue = self._queues[client] = asyncio.Queue()
        return client, queue

    def close(self, client: bytes) -> None:
        self._queues.pop(client, None)

    def __len__(self) -> int:
        """HTTP requests being answered now."""
        return len(self._queues)

    async def send(self, client: bytes, msg: p.ServerMessage) -> None:
        if is_http_client(client):
            queue = self._queues.get(client)
            if queue is not None:
                queue.put_nowait(msg)
            return
        await self._sockets.send(client, msg)

    async def reply_error(self, client: bytes, request_id: str, code: ErrorCode | str, message: str,
                          trace_id: str = "") -> None:
        """The one way a client learns its request failed (logged as `request.error`)."""
        if not is_http_client(client):
            await self._sockets.reply_error(client, request_id, code, message, trace_id)
            return
        code = code.value if isinstance(code, ErrorCode) else code
        log.warning("request.error", request_id=request_id, code=code, error=message,
                    **({"trace_id": trace_id} if trace_id else {}))
        await self.send(client, p.ErrorReply(request_id=request_id, code=code, message=message))

    @staticmethod
    def socket_clients(clients: list[bytes]) -> list[bytes]:
        """The ZeroMQ clients among `clients` (the keepalive probe's targets: an HTTP client's
        disconnect is seen by its own handler)."""
        return [c for c in clients if not is_http_client(c)]
