"""The scheduler process: sockets around the `Scheduler`.

Two ROUTER sockets: frontends connect to one, workers to the other. One step is
in flight at a time: plan -> every rank -> rank 0's result -> token deltas to
the frontends. Until every rank has said hello there is no `Scheduler` (its
pool size is the smallest rank's capacity), and frontends are told `ready=False`.

Composed, not mixed in: the loop owns the ZeroMQ context, the sockets, the
poller and the drain; it holds a `FrontendLink` (scheduler/frontend_link.py:
known frontends, liveness, replies), a `WorkerLink` (scheduler/worker_link.py:
the worker group, the `Scheduler`, steps, failure and recovery) and the step
figures (scheduler/step_stats.py), and routes the frontends' requests to the
`Scheduler`.

The ranks of a tensor-parallel group are one worker to everything here but the
handshake (worker/parallel.py splits the model; rank 0 alone answers). A rank
that dies, hangs or fails a step fails the group; its sequences are preempted by
recompute and planning resumes when the group has joined again
(scheduler/worker_link.py, docs/fault_tolerance.md).

systemd: READY=1 once both sockets are bound (workers and frontends may then
connect); WATCHDOG=1 from this loop, which never blocks longer than IDLE_POLL_MS.

Stopping (shared/drain.py): on SIGTERM (or SIGINT) new requests are refused with
`shutting_down` and the requests in flight run to the end, for at most
drain_timeout_s; then, or on a second signal, what is left finishes with "abort".
Finally every worker is sent `Shutdown` and the process exits 0.
"""

from __future__ import annotations

import time
import uuid

import zmq

from scheduler.frontend_link import FrontendLink
from scheduler.kv_events import KvPublisher
from scheduler.router import Router
from scheduler.step_stats import StepStats
from scheduler.waker import Waker
from scheduler.worker_group import WorkerGroup
from scheduler.worker_link import WorkerLink
from shared import protocol as p
from shared.config import ServerConfig
from shared.curve import serve_curve_threaded
from shared.drain import Drain
from shared.ipc import bind, make_router
from shared.logging import get_logger
from shared.sdnotify import Notifier

log = get_logger()

IDLE_POLL_MS = 200
IDLE_STATS_EVERY_S = 300.0  # an idle server still says it is alive, but rarely
FLUSH_ON_EXIT_MS = 2000  # let the last deltas and Shutdowns leave before the sockets close


class SchedulerLoop:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.ctx = zmq.Context()
        self.frontend_sock = make_router(self.ctx)
        self.worker_sock = make_router(self.ctx)
        self.poller = zmq.Poller()
        self.poller.register(self.frontend_sock, zmq.POLLIN)
        self.poller.register(self.worker_sock, zmq.POLLIN)
        self.waker = Waker()  # the grammar compiler's threads: a structured request's grammar is ready
        self.poller.register(self.waker.fd, zmq.POLLIN)
        self.drain = Drain(config.operations.drain_timeout_s)
        self.notifier = Notifier()
        self.step_stats = StepStats()
        self.step_stats.sample(time.monotonic(), 0)  # rates count from start-up
        scheduler_id = uuid.uuid4().hex[:12]
        self.frontends = FrontendLink(Router(self.frontend_sock), scheduler_id=scheduler_id,
                                      engine_info=self._engine_info, abort_frontend=self._abort_frontend,
                                      on_join=lambda ident: self.frontends.send(ident, self.kv_events.snapshot()))
        self.kv_events = KvPublisher(scheduler_id, lambda: self.workers.scheduler, self.frontends.broadcast,
                                     lambda: self.step_stats.figures()["step_time_p50_s"],
                                     lambda: self.drain.draining)
        self.workers = WorkerLink(Router(self.worker_sock), WorkerGroup(config.parallel.tensor_parallel_size),
                                  config=config.scheduler, step_stats=self.step_stats, notifier=self.notifier,
                                  send_deltas=self.frontends.send_deltas, on_ready=self.frontends.announce_info,
                                  wake=self.waker.wake)
        self._next_stats_at = time.monotonic() + config.scheduler.stats_interval_s
        self._last_logged_steps: int | None = None
        self._last_stats_log = float("-inf")
        self._auth = None  # the CURVE authenticator of the frontend endpoint, when configured

    # -- main loop ------------------------------------------------------------
    def run(self) -> None:
        self.drain.install()
        endpoints, routing = self.config.endpoints, self.config.routing
        if routing.engine_curve_secret_key_file:  # frontends on other hosts (docs/data_parallel.md)
            self._auth = serve_curve_threaded(self.ctx, self.frontend_sock, routing.engine_curve_secret_key_file,
                                              routing.engine_curve_frontends_dir)
        bind(self.frontend_sock, endpoints.scheduler_addr_for_frontends())
        bind(self.worker_sock, endpoints.scheduler_addr_for_workers())
        workers = self.config.parallel.tensor_parallel_size
        log.info("scheduler.listening", frontends=endpoints.scheduler_addr_for_frontends(),
                 workers=endpoints.scheduler_addr_for_workers(), workers_expected=workers)
        self.notifier.ready(f"listening; waiting for {workers} worker(s)")
        while not self._drained():
            self.notifier.tick()
            idle_ms = min(IDLE_POLL_MS, 1000 * self.kv_events.due_in_s(time.monotonic()))
            events = dict(self.poller.poll(0 if self.workers.ready_to_step() else idle_ms))
            if self.worker_sock in events:
                self.workers.router.receive_all(self.workers.receive)
            if self.frontend_sock in events:
                self.frontends.router.receive_all(self._on_frontend)
            if self.waker.fd in events:
                self.waker.clear()
                self._admit_compiled()
            self.workers.check_liveness()
            self.frontends.check_liveness()
            if self.workers.ready_to_step():
                self.workers.start_step()
            self.kv_events.tick()
            if time.monotonic() >= self._next_stats_at:
                self._log_stats()
        self._shut_down()

    # -- frontends' requests ----------------------------------------------------------
    def _on_frontend(self, ident: bytes, frame: bytes) -> None:
        msg = self.frontends.receive(ident, frame)
        sched = self.workers.scheduler
        if isinstance(msg, p.AddRequest):
            if self.drain.draining:
                self.frontends.send(ident, p.RequestRejected(msg.request_id, p.ErrorCode.SHUTTING_DOWN.value,
                                                             "the server is shutting down"))
            elif sched is None:
                self.frontends.send(ident, p.RequestRejected(msg.request_id, p.ErrorCode.UNAVAILABLE.value,
                                                             "no worker is ready yet"))
            else:
                rejected = sched.add_request(msg, ident)
                if rejected is not None:
                    self.frontends.send(ident, rejected)
        elif isinstance(msg, p.AbortRequests):
            if sched is not None:
                self.frontends.send_deltas(sched.abort(msg.request_ids))
        elif isinstance(msg, p.FinishOutputs):  # single outputs ended by a stop string
            if sched is not None:
                self.frontends.send_deltas(sched.finish_outputs(msg.outputs))
        elif isinstance(msg, p.StatsQuery):
            self.frontends.send(ident, p.StatsResult(query_id=msg.query_id, stats=self.stats_reply()))
        elif isinstance(msg, p.KvSnapshotQuery):  # the frontend saw a gap in our KvEvents
            self.frontends.send(ident, self.kv_events.snapshot())
        elif isinstance(msg, p.TokenizerInfo):
            if sched is not None:
                sched.structured.set_tokenizer(msg.tokenizer_json)

    def _admit_compiled(self) -> None:
        """Structured requests whose grammar is done join the queue; failed ones are rejected."""
        sched = self.workers.scheduler
        if sched is None:
            return
        for ident, rejected in sched.admit_compiled():
            self.frontends.send(ident, rejected)

    def _engine_info(self) -> p.EngineInfo:
        return self.workers.engine_info()

    def _abort_frontend(self, ident: bytes) -> list[str]:
        sched = self.workers.scheduler
        return sched.abort_frontend(ident) if sched is not None else []

    # -- stopping -------------------------------------------------------------------
    def _drained(self) -> bool:
        """Acts on signals and the drain deadline; True once a drain is complete: nothing is
        left in flight."""
        sched = self.workers.scheduler
        transition = self.drain.poll(work_left=sched is not None and (sched.has_work() or sched.awaiting_grammar() > 0))
        if transition == "begin":
            in_flight = sched.stats()["requests_in_flight"] if sched else 0
            log.info("scheduler.draining", requests_in_flight=in_flight, timeout_s=self.drain.timeout_s)
            self.notifier.stopping(f"draining {in_flight} request(s)")
        elif transition == "abort" and sched is not None:
            outputs = sched.abort_all()
            log.warning("scheduler.drain_aborted", cause=self.drain.abort_cause,
                        request_ids=sorted({delta.request_id for _, delta in outputs}))
            self.frontends.send_deltas(outputs)
        if not self.drain.draining:
            return False
        if sched is None:
            return True
        # A step still in flight after an abort holds only finished sequences: no need to wait.
        return (not sched.has_work() and not sched.awaiting_grammar()
                and (sched.in_flight is None or self.drain.aborted))

    def _shut_down(self) -> None:
        self.workers.shut_down("the scheduler is stopping")
        stats = self.stats()
        if self.workers.scheduler is not None:
            # Final totals: a run shorter than stats_interval_s would otherwise leave no stats line at all.
            log.info("scheduler.stats", **stats)
        log.info("scheduler.stopped", requests_finished=stats.get("requests_finished", 0),
                 requests_aborted=stats.get("requests_aborted", 0))
        if self.workers.scheduler is not None:
            self.workers.scheduler.structured.close()
        for sock in (self.frontend_sock, self.worker_sock):
            sock.close(linger=FLUSH_ON_EXIT_MS)
        self.waker.close()
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    # -- visibility ---------------------------------------------------------------
    def stats(self) -> dict:
        """The Scheduler's gauges and counters plus throughput, step times and derived rates."""
        sched = self.workers.scheduler
        stats = dict(sched.stats()) if sched is not None else {}
        stats.update(self.step_stats.figures())
        hits, queried = stats.get("prefix_cache_hit_tokens"), stats.get("prefix_cache_queried_tokens")
        if hits is not None and queried is not None and "prefix_cache_hit_rate" not in stats:
            # Since start: of the prompt tokens looked up in the prefix cache, the share found there.
            stats["prefix_cache_hit_rate"] = round(hits / queried, 4) if queried else 0.0
        stats["workers_ready"] = self.workers.group.ready_count()
        stats["draining"] = self.drain.draining
        return stats

    def stats_reply(self) -> dict:
        """`stats()` plus the per-batch-size decode phase totals (too long for every log line)."""
        return {**self.stats(), "decode_phases": self.step_stats.phase_totals()}

    def _log_stats(self) -> None:
        """Every interval while there is work; when idle, once more and then every IDLE_STATS_EVERY_S."""
        now = time.monotonic()
        self._next_stats_at = now + self.config.scheduler.stats_interval_s
        sched = self.workers.scheduler
        if sched is None:
            return
        self.step_stats.sample(now, sched.stats().get("tokens_generated", 0))
        stats = self.stats()
        self.notifier.status(f"running {stats['running']}, waiting {stats['waiting']}, "
                             f"KV blocks {stats['kv_blocks_used']}/{stats['kv_blocks_total']}")
        idle = stats.get("requests_in_flight", 0) == 0 and stats.get("steps") == self._last_logged_steps
        if idle and now - self._last_stats_log < IDLE_STATS_EVERY_S:
            return
        self._last_logged_steps, self._last_stats_log = stats.get("steps"), now
        log.info("scheduler.stats", **stats)


def run_scheduler(config: ServerConfig) -> int:
    """Returns 0 after a drain; a fatal error raises (and the CLI exits 1)."""
    SchedulerLoop(config).run()
    return 0
