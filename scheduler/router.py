"""One ROUTER socket as the links use it: send a message to a peer, take every frame waiting."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import zmq


class Router:
    """Wraps a ROUTER socket that the loop (scheduler/loop.py) creates, binds, polls and closes.

    Every ROUTER socket has ROUTER_MANDATORY (shared/ipc.py): a send to a peer that is gone
    fails at once, and `send` says so by returning False instead of raising."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self._encoder.encode(msg)

    def send(self, ident: bytes, msg: msgspec.Struct) -> bool:
        """Send `msg` to the peer `ident`; False if it is unreachable."""
        return self.send_frame(ident, self._encoder.encode(msg))

    def send_frame(self, ident: bytes, frame: bytes) -> bool:
        """Send an encoded frame (one plan to every rank is encoded once); False if unreachable."""
        try:
            self.sock.send_multipart([ident, frame])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True

    def receive_all(self, handle: Callable[[bytes, bytes], None]) -> None:
        """`handle(identity, frame)` for every frame waiting; frames of another shape are dropped."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 2:
                handle(frames[0], frames[1])
