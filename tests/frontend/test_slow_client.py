"""A client that stops reading its replies cannot stall the frontend: once its queue is at the
high-water mark a send to it fails at once and the client is dropped like a disconnected one
(frontend/server.py `_send_frame`)."""

from __future__ import annotations

import asyncio
import types

import zmq
import zmq.asyncio

from frontend.server import FrontendServer
from shared.ipc import make_router


def test_sends_to_a_client_that_does_not_read_never_block():
    async def main():
        ctx = zmq.asyncio.Context()
        router = make_router(ctx, sndhwm=8)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        reader = ctx.socket(zmq.DEALER)  # never reads after its first send
        reader.setsockopt(zmq.IDENTITY, b"slow")
        reader.setsockopt(zmq.RCVHWM, 8)
        reader.setsockopt(zmq.RCVBUF, 4096)
        reader.connect(f"tcp://127.0.0.1:{port}")
        await reader.send(b"hello")
        ident, _ = await router.recv_multipart()
        gone: list[tuple[bytes, str]] = []

        async def client_gone(client, cause):
            gone.append((client, cause))

        server = types.SimpleNamespace(clients=router, _client_gone=client_gone)
        frame = b"x" * 65536
        for _ in range(10_000):  # each send returns at once, whatever the client does
            await asyncio.wait_for(FrontendServer._send_frame(server, ident, frame), timeout=5)
            if gone:
                break
        assert gone == [(b"slow", "not_reading")]
        await FrontendServer._send_frame(server, b"nobody", b"x")  # an unknown peer: unreachable
        assert gone[-1] == (b"nobody", "unreachable")
        ctx.destroy(linger=0)

    asyncio.run(main())
