"""uvicorn (httptools) serving the HTTP API on the frontend's own event loop (uvloop).

Not a process of its own: the API's handlers call the frontend's parts directly, and a reply
for an HTTP request is a `put_nowait` on the loop both share. The socket is bound by `bind`,
before anything is served, so a taken port is a start-up error with the address in it; uvicorn
only serves it. Signals stay the frontend's: SIGTERM drains (frontend/main.py), and the listener
keeps answering meanwhile (503 shutting_down, /health 503), until `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn

from frontend.http.auth import split_listen
from shared.logging import get_logger

log = get_logger()

KEEP_ALIVE_S = 75  # longer than the idle timeouts of the usual load balancers (60 s), as vLLM does
SHUTDOWN_GRACE_S = 3  # `stop`: responses still being written get this long to finish


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the frontend's Drain owns SIGTERM/SIGINT."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpListener:
    """Owns the listening socket and the uvicorn server on it."""

    def __init__(self, app, listen: str, auth: bool) -> None:
        self._listen = listen
        self._auth = auth
        self._sock: socket.socket | None = None
        self._server = _Server(uvicorn.Config(
            app, http="httptools", ws="none", lifespan="off", log_config=None, access_log=False,
            server_header=False, proxy_headers=False, timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        self._finished = asyncio.Event()

    def bind(self) -> None:
        host, port = split_listen(self._listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, port), family=family, backlog=2048)
        except OSError as e:
            raise OSError(f"--http-listen {self._listen}: cannot listen there: {e}") from None
        log.info("http.listening", address=self._listen, auth=self._auth)

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one chosen for port 0)."""
        assert self._sock is not None, "bind() first"
        return self._sock.getsockname()[1]

    async def serve(self) -> None:
        """Serve until `stop` (or until cancelled). Call `bind` first."""
        assert self._sock is not None, "bind() first"
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            self._finished.set()

    async def stop(self) -> None:
        """Stop accepting connections; let responses being written finish (SHUTDOWN_GRACE_S at
        most, then uvicorn cancels them); return once the server is done."""
        self._server.should_exit = True
        if self._server.started:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), SHUTDOWN_GRACE_S + 1)
        elif self._sock is not None:
            self._sock.close()  # bound, never served
