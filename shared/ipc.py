"""ZeroMQ socket set-up shared by every role.

Why these options:
* LINGER 0: a dying process must not hang on unsent frames.
* MAXMSGSIZE: a peer cannot make us allocate an unbounded frame.
* ROUTER_MANDATORY: a reply to an unknown or gone peer raises instead of being
  dropped silently, so we can log it and clean up.
* ipc sockets live in a run directory only our user (and group) can enter.
"""

from __future__ import annotations

import os

import zmq

MAX_FRAME_BYTES = 64 * 1024 * 1024  # one frame: a 1M-token prompt fits with room to spare


def _common(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    return sock


def make_router(ctx: zmq.Context, *, sndhwm: int = 0, rcvhwm: int = 0) -> zmq.Socket:
    """A ROUTER that raises on undeliverable replies (zmq.ZMQError EHOSTUNREACH)."""
    sock = _common(ctx.socket(zmq.ROUTER))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    return sock


def make_dealer(ctx: zmq.Context, *, identity: bytes | None = None) -> zmq.Socket:
    sock = _common(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def prepare_endpoint(addr: str) -> None:
    """Before bind: create the ipc socket's private directory and remove a stale socket file."""
    if not addr.startswith("ipc://"):
        return
    path = addr[len("ipc://"):]
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o750, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)


def bind(sock: zmq.Socket, addr: str) -> None:
    prepare_endpoint(addr)
    try:
        sock.bind(addr)
    except zmq.ZMQError as e:
        raise OSError(f"cannot bind {addr}: {e}") from e
