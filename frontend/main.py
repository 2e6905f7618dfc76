"""`pagedserve frontend`: load the tokenizer, serve clients until stopped, then drain.

systemd: READY=1 when the frontend logs `server.ready` (the scheduler and every
worker are ready, requests are accepted from then on); WATCHDOG=1 from a task
on the event loop, so a blocked loop stops the pings.

SIGHUP: re-read `[routing] engines` from the config file; replicas join and leave
(docs/data_parallel.md).

Stopping: on SIGTERM (or SIGINT) new requests are refused with `shutting_down`
and those in flight get drain_timeout_s to finish; then, or on a second signal,
what is left ends with finish_reason "abort". Exit 0.

HTTP (--http-listen, docs/http.md): settings that must stop the listener (a non-loopback
address without API keys, an unreadable key file) stop the frontend first thing, before the
tokenizer loads: one line on stderr, exit 2, as the launcher does for a missing model.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from shared.config import ServerConfig
from shared.drain import Drain
from shared.logging import get_logger
from shared.models import resolve_model
from shared.sdnotify import Notifier

log = get_logger()

DRAIN_POLL_S = 0.05
FLUSH_ON_EXIT_MS = 2000  # let the last completions reach their clients


def run_frontend(config: ServerConfig, reload=None) -> int:
    """`reload()`: the config read again (launcher/flags.py `config_reloader`); on SIGHUP the
    frontend takes its `[routing] engines` from it: replicas join and leave at runtime."""
    import uvloop

    from frontend.server import FrontendServer
    from frontend.tokenizer import Tokenizer

    http_keys = _http_keys_or_exit(config) if config.frontend.http_listen else None
    files = resolve_model(config.model.model)
    tokenizer = Tokenizer(files)
    log.info("frontend.tokenizer_loaded", model=files.name, vocab=len(tokenizer))
    signalled = asyncio.Event()  # set from the signal handler (on the loop), so the waits below wake at once
    drain = Drain(config.operations.drain_timeout_s, on_signal=signalled.set)
    server = FrontendServer(config, tokenizer, files.name, drain, http_keys=http_keys)
    return uvloop.run(_serve_until_stopped(server, drain, signalled, Notifier(), reload))


def _http_keys_or_exit(config: ServerConfig):
    from frontend.http.auth import HttpConfigError, keys_for

    try:
        return keys_for(config.frontend)
    except HttpConfigError as e:
        print(f"pagedserve frontend: {e}", file=sys.stderr)
        raise SystemExit(2) from None


async def _serve_until_stopped(server, drain: Drain, signalled: asyncio.Event, notifier: Notifier,
                               reload=None) -> int:
    drain.install_on_loop(asyncio.get_running_loop())
    if reload is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload_engines, server, reload)
    notifier.status("waiting for the scheduler and the workers")
    serving = asyncio.create_task(server.run())
    watchdog = asyncio.create_task(_ready_then_watchdog(server, notifier))
    stopping = asyncio.create_task(signalled.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # a fatal error: raise it
            raise RuntimeError("the frontend's server loop ended by itself")
        await _drain(server, drain, signalled, notifier)
    finally:
        for task in (serving, watchdog, stopping):
            task.cancel()
        await asyncio.gather(serving, watchdog, stopping, return_exceptions=True)
        server.close(FLUSH_ON_EXIT_MS)
    log.info("frontend.stopped")
    return 0


def _reload_engines(server, reload) -> None:
    """SIGHUP: the engines list from the config file again (docs/data_parallel.md). A bad file
    changes nothing."""
    from shared.config_file import ConfigError

    try:
        config = reload()
    except ConfigError as e:
        log.error("frontend.reload_failed", error=str(e))
        return
    server.engine.set_engines(config.routing.resolved_engines(config.endpoints.scheduler_addr_for_frontends()))


async def _ready_then_watchdog(server, notifier: Notifier) -> None:
    await server.status.became_ready.wait()
    notifier.ready(f"serving on {server.config.endpoints.listen}")
    period = notifier.tick_period_s
    while period is not None:
        notifier.tick()
        await asyncio.sleep(period / 2)  # tick() itself sends at most one ping per period


async def _drain(server, drain: Drain, signalled: asyncio.Event, notifier: Notifier) -> None:
    """Refuse new requests (`drain.draining` from the first poll on); wait for those in flight
    until none is left, the drain's deadline passes or a second signal comes."""
    signalled.clear()
    drain.poll()  # "begin"; or "abort" at once, had two signals come before we looked
    in_flight = len(server.table)
    log.info("frontend.draining", requests_in_flight=in_flight, timeout_s=drain.timeout_s)
    notifier.stopping(f"draining {in_flight} request(s)")
    while server.table and not drain.aborted:
        try:
            await asyncio.wait_for(signalled.wait(), DRAIN_POLL_S)
        except TimeoutError:
            pass
        signalled.clear()
        drain.poll(work_left=bool(server.table))
    if server.table:
        request_ids = await server.abort_in_flight()
        log.warning("frontend.drain_aborted", cause=drain.abort_cause, request_ids=request_ids)
