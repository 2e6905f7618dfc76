"""A client that stops reading its replies cannot stall the frontend: once its queue is at the
high-water mark a send to it fails at once and the client is reported gone like a disconnected
one (frontend/client_socket.py `ClientSocket.send_frame`)."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from frontend.client_socket import ClientSocket


def test_sends_to_a_client_that_does_not_read_never_block():
    async def main():
        ctx = zmq.asyncio.Context()
        gone: list[tuple[bytes, str]] = []

        async def client_gone(client, cause):
            gone.append((client, cause))

        clients = ClientSocket(ctx, on_gone=client_gone, sndhwm=8)
        port = clients.sock.bind_to_random_port("tcp://127.0.0.1")
        reader = ctx.socket(zmq.DEALER)  # never reads after its first send
        reader.setsockopt(zmq.IDENTITY, b"slow")
        reader.setsockopt(zmq.RCVHWM, 8)
        reader.setsockopt(zmq.RCVBUF, 4096)
        reader.connect(f"tcp://127.0.0.1:{port}")
        await reader.send(b"hello")
        ident, _ = await clients.recv()
        frame = b"x" * 65536
        for _ in range(10_000):  # each send returns at once, whatever the client does
            await asyncio.wait_for(clients.send_frame(ident, frame), timeout=5)
            if gone:
                break
        assert gone == [(b"slow", "not_reading")]
        await clients.send_frame(b"nobody", b"x")  # an unknown peer: unreachable
        assert gone[-1] == (b"nobody", "unreachable")
        reader.close(linger=0)
        clients.close(linger_ms=0)
        ctx.term()

    asyncio.run(main())
