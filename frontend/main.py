"""`pagedserve frontend`: load the tokenizer, serve clients until stopped, then drain.

systemd: READY=1 when the frontend logs `server.ready` (the scheduler and every
worker are ready, requests are accepted from then on); WATCHDOG=1 from a task
on the event loop, so a blocked loop stops the pings.

Stopping: on SIGTERM (or SIGINT) new requests are refused with `shutting_down`
and those in flight get drain_timeout_s to finish; then, or on a second signal,
what is left ends with finish_reason "abort". Exit 0.
"""

from __future__ import annotations

import asyncio
import signal
import time

from shared.config import ServerConfig
from shared.logging import get_logger
from shared.models import resolve_model
from shared.sdnotify import Notifier

log = get_logger()

DRAIN_POLL_S = 0.05
FLUSH_ON_EXIT_MS = 2000  # let the last completions reach their clients


def run_frontend(config: ServerConfig) -> int:
    import uvloop

    from frontend.server import FrontendServer
    from frontend.tokenizer import Tokenizer

    files = resolve_model(config.model.model)
    tokenizer = Tokenizer(files)
    log.info("frontend.tokenizer_loaded", model=files.name, vocab=len(tokenizer))
    server = FrontendServer(config, tokenizer, files.name)
    return uvloop.run(_serve_until_stopped(server, config, Notifier()))


async def _serve_until_stopped(server, config: ServerConfig, notifier: Notifier) -> int:
    loop = asyncio.get_running_loop()
    stop, abort_now = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (abort_now if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    notifier.status("waiting for the scheduler and the workers")
    serving = asyncio.create_task(server.run())
    watchdog = asyncio.create_task(_ready_then_watchdog(server, notifier))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # a fatal error: raise it
            raise RuntimeError("the frontend's server loop ended by itself")
        await _drain(server, config.operations.drain_timeout_s, abort_now, notifier)
    finally:
        for task in (serving, watchdog, stopping):
            task.cancel()
        await asyncio.gather(serving, watchdog, stopping, return_exceptions=True)
        server.close(FLUSH_ON_EXIT_MS)
    log.info("frontend.stopped")
    return 0


async def _ready_then_watchdog(server, notifier: Notifier) -> None:
    await server.became_ready.wait()
    notifier.ready(f"serving on {server.config.endpoints.listen}")
    period = notifier.tick_period_s
    while period is not None:
        notifier.tick()
        await asyncio.sleep(period / 2)  # tick() itself sends at most one ping per period


async def _drain(server, timeout_s: float, abort_now: asyncio.Event, notifier: Notifier) -> None:
    """Refuse new requests; wait for those in flight, up to `timeout_s` or `abort_now`."""
    server.draining = True
    log.info("frontend.draining", requests_in_flight=len(server.requests), timeout_s=timeout_s)
    notifier.stopping(f"draining {len(server.requests)} request(s)")
    deadline = time.monotonic() + timeout_s
    while server.requests and not abort_now.is_set() and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(abort_now.wait(), DRAIN_POLL_S)
        except asyncio.TimeoutError:
            pass
    if server.requests:
        cause = "second_signal" if abort_now.is_set() else "drain_timeout"
        request_ids = await server.abort_in_flight()
        log.warning("frontend.drain_aborted", cause=cause, request_ids=request_ids)
