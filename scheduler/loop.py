"""The scheduler process: sockets around the `Scheduler`.

Two ROUTER sockets: frontends connect to one, workers to the other. One step is
in flight at a time: plan -> every rank -> rank 0's result -> token deltas to
the frontends. Until every rank has said hello there is no `Scheduler` (its
pool size is the smallest rank's capacity), and frontends are told `ready=False`.

The ranks of a tensor-parallel group are one worker to everything here but the
handshake (worker/parallel.py splits the model; rank 0 alone answers). A rank
that dies, hangs or fails a step fails the group; its sequences are preempted by
recompute and planning resumes when the group has joined again
(scheduler/worker_link.py, docs/fault_tolerance.md).

systemd: READY=1 once both sockets are bound (workers and frontends may then
connect); WATCHDOG=1 from this loop, which never blocks longer than IDLE_POLL_MS.

Stopping: on SIGTERM (or SIGINT) new requests are refused with `shutting_down`
and the requests in flight run to the end, for at most drain_timeout_s; then, or
on a second signal, what is left finishes with "abort". Finally every worker is
sent `Shutdown` and the process exits 0.
"""

from __future__ import annotations

import collections
import signal
import time
import uuid

import msgspec
import zmq

from scheduler.scheduler import Scheduler
from scheduler.step_stats import StepStats
from scheduler.worker_group import WorkerGroup
from scheduler.worker_link import WorkerLink
from shared import protocol as p
from shared.config import ServerConfig
from shared.ipc import bind, make_router
from shared.logging import get_logger
from shared.sdnotify import Notifier

log = get_logger()

IDLE_POLL_MS = 200
FRONTEND_SILENCE_S = 30.0  # a frontend pings every second; one silent this long is gone: abort its requests
MAX_DROPPED_FRONTENDS = 1024  # identities remembered for EngineInfo.frontend_drops
UNKNOWN_PEER_LOG_EVERY_S = 10.0  # at most one `scheduler.unknown_frontend` event this often
IDLE_STATS_EVERY_S = 300.0  # an idle server still says it is alive, but rarely
FLUSH_ON_EXIT_MS = 2000  # let the last deltas and Shutdowns leave before the sockets close


class SchedulerLoop(WorkerLink):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.ctx = zmq.Context()
        self.frontend_sock = make_router(self.ctx)
        self.worker_sock = make_router(self.ctx)
        self.encoder = msgspec.msgpack.Encoder()
        self.frontend_decoder = p.decoder_for(p.FrontendMessage)
        self._init_worker_link()
        # Known frontends (they said hello), identity -> monotonic seconds of their last message.
        # Frames from any other peer are ignored: the socket takes frames only from known peers.
        self.frontends: dict[bytes, float] = {}
        self._unknown_frontend_logged = float("-inf")
        self._frontend_drops: dict[bytes, int] = {}  # identity -> times declared gone (EngineInfo.frontend_drops)
        self.scheduler_id = uuid.uuid4().hex[:12]
        self.workers = WorkerGroup(config.parallel.tensor_parallel_size)
        self.scheduler: Scheduler | None = None
        self.in_flight: p.StepPlan | None = None
        self._plan_timing = (0.0, 0.0)  # perf_counter seconds: the in-flight plan's schedule start, and its send
        self.info = p.EngineInfo(ready=False, workers_expected=config.parallel.tensor_parallel_size,
                                 scheduler_id=self.scheduler_id)
        self._next_stats_at = time.monotonic() + config.scheduler.stats_interval_s
        self.step_stats = StepStats()
        self.step_stats.sample(time.monotonic(), 0)  # rates count from start-up
        self._last_logged_steps: int | None = None
        self._last_stats_log = float("-inf")
        self.notifier = Notifier()
        self.signals = 0  # SIGTERM/SIGINT received
        self._signals_seen = 0
        self._drain_deadline: float | None = None  # monotonic seconds; set while draining
        self._aborted = False  # what was in flight was aborted: stop without waiting for the step

    def _on_signal(self, _signum, _frame) -> None:
        self.signals += 1  # acted on by the loop, not here

    # -- main loop ------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        bind(self.frontend_sock, self.config.endpoints.scheduler_addr_for_frontends())
        bind(self.worker_sock, self.config.endpoints.scheduler_addr_for_workers())
        log.info("scheduler.listening", frontends=self.config.endpoints.scheduler_addr_for_frontends(), workers=self.config.endpoints.scheduler_addr_for_workers(),
                 workers_expected=self.config.parallel.tensor_parallel_size)
        self.notifier.ready(f"listening; waiting for {self.config.parallel.tensor_parallel_size} worker(s)")
        poller = zmq.Poller()
        poller.register(self.frontend_sock, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        while not self._drained():
            self.notifier.tick()
            busy = self._can_step() and self.scheduler.has_work()
            events = dict(poller.poll(0 if busy else IDLE_POLL_MS))
            if self.worker_sock in events:
                self._recv_all(self.worker_sock, self._on_worker)
            if self.frontend_sock in events:
                self._recv_all(self.frontend_sock, self._on_frontend)
            self._check_liveness()
            self._check_frontends()
            if self._can_step() and self.scheduler.has_work():
                self._start_step()
            if time.monotonic() >= self._next_stats_at:
                self._log_stats()
        self._shut_down()

    # -- stopping -------------------------------------------------------------------
    def _drained(self) -> bool:
        """Acts on signals; True once a drain is complete: nothing is left in flight."""
        if self.signals != self._signals_seen:
            first = self._signals_seen == 0 and self.signals == 1
            self._signals_seen = self.signals
            if first:
                self._drain_deadline = time.monotonic() + self.config.operations.drain_timeout_s
                in_flight = self.scheduler.stats()["requests_in_flight"] if self.scheduler else 0
                log.info("scheduler.draining", requests_in_flight=in_flight, timeout_s=self.config.operations.drain_timeout_s)
                self.notifier.stopping(f"draining {in_flight} request(s)")
            else:
                self._abort_all("second_signal")
        if self._drain_deadline is None:
            return False
        if self.scheduler is None:
            return True
        if self.scheduler.has_work() and time.monotonic() >= self._drain_deadline:
            self._abort_all("drain_timeout")
        # A step still in flight after an abort holds only finished sequences: no need to wait.
        return not self.scheduler.has_work() and (self.in_flight is None or self._aborted)

    def _abort_all(self, cause: str) -> None:
        if self.scheduler is None:
            return
        outputs = self.scheduler.abort_all()
        self._aborted = True
        log.warning("scheduler.drain_aborted", cause=cause,
                    request_ids=sorted({delta.request_id for _, delta in outputs}))
        self._send_deltas(outputs)

    def _shut_down(self) -> None:
        reason = "the scheduler is stopping"
        for _, ident in self.workers.identities():
            self._send_worker(ident, p.Shutdown(reason=reason))
        stats = self.stats()
        log.info("scheduler.stopped", requests_finished=stats.get("requests_finished", 0),
                 requests_aborted=stats.get("requests_aborted", 0))
        for sock in (self.frontend_sock, self.worker_sock):
            sock.close(linger=FLUSH_ON_EXIT_MS)
        self.ctx.term()

    def _send_worker(self, ident: bytes, msg) -> None:
        try:
            self.worker_sock.send_multipart([ident, self.encoder.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("scheduler.worker_gone", worker=ident.decode(errors="replace"))

    def _recv_all(self, sock: zmq.Socket, handle) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 2:
                handle(frames[0], frames[1])

    # -- frontends ----------------------------------------------------------------
    def _on_frontend(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = self.frontend_decoder.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            log.error("scheduler.bad_frontend_frame", error=str(e))
            return
        if isinstance(msg, p.FrontendHello):
            self.frontends[ident] = time.monotonic()
            self._send_frontend(ident, self._info_for(ident))
            return
        if ident not in self.frontends:
            self._on_unknown_frontend(ident, msg)
            return
        self.frontends[ident] = time.monotonic()
        if isinstance(msg, p.AddRequest):
            if self._drain_deadline is not None:
                self._send_frontend(ident, p.RequestRejected(msg.request_id, p.ErrorCode.SHUTTING_DOWN.value,
                                                             "the server is shutting down"))
                return
            if self.scheduler is None:
                self._send_frontend(ident, p.RequestRejected(msg.request_id, p.ErrorCode.UNAVAILABLE.value,
                                                             "no worker is ready yet"))
                return
            rejected = self.scheduler.add_request(msg, ident)
            if rejected is not None:
                self._send_frontend(ident, rejected)
        elif isinstance(msg, p.AbortRequests):
            if self.scheduler is not None:
                self._send_deltas(self.scheduler.abort(msg.request_ids))
                if msg.stop_outputs:  # single outputs ended by a stop string
                    self._send_deltas(self.scheduler.stop_outputs(msg.stop_outputs))
        elif isinstance(msg, p.StatsQuery):
            self._send_frontend(ident, p.StatsResult(query_id=msg.query_id, stats=self.stats_reply()))

    def _on_unknown_frontend(self, ident: bytes, msg) -> None:
        """A frame from a peer that never said hello (or was declared gone): not acted on. A
        live frontend pings every second, and its next `EngineInfo` makes it resubmit what it
        holds if this scheduler is new to it (frontend/resubmit.py), so nothing is lost."""
        now = time.monotonic()
        if now - self._unknown_frontend_logged >= UNKNOWN_PEER_LOG_EVERY_S:
            self._unknown_frontend_logged = now
            log.warning("scheduler.unknown_frontend", frontend=ident.decode(errors="replace"),
                        kind=type(msg).__name__)

    def _send_frontend(self, ident: bytes, msg) -> None:
        try:
            self.frontend_sock.send_multipart([ident, self.encoder.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._frontend_gone(ident, "unreachable")

    def _info_for(self, ident: bytes) -> p.EngineInfo:
        drops = self._frontend_drops.get(ident, 0)
        return msgspec.structs.replace(self.info, frontend_drops=drops) if drops else self.info

    def _frontend_gone(self, ident: bytes, cause: str) -> None:
        """Its requests can no longer be answered: free their blocks. (Their finishing deltas
        go nowhere.) Should it come back (it was only paused), `EngineInfo.frontend_drops`
        tells it to resubmit them."""
        self.frontends.pop(ident, None)
        if len(self._frontend_drops) >= MAX_DROPPED_FRONTENDS:
            self._frontend_drops.clear()  # forgetting costs a paused frontend its requests, nothing else
        self._frontend_drops[ident] = self._frontend_drops.get(ident, 0) + 1
        request_ids = self.scheduler.abort_frontend(ident) if self.scheduler is not None else []
        log.warning("scheduler.frontend_gone", frontend=ident.decode(errors="replace"), request_ids=request_ids,
                    cause=cause)

    def _check_frontends(self) -> None:
        now = time.monotonic()
        for ident, seen in list(self.frontends.items()):
            if now - seen > FRONTEND_SILENCE_S:
                self._frontend_gone(ident, "silent")

    def _send_deltas(self, outputs: list[tuple[bytes, p.TokenDelta]]) -> None:
        by_frontend: dict[bytes, list[p.TokenDelta]] = collections.defaultdict(list)
        for ident, delta in outputs:
            by_frontend[ident].append(delta)
        for ident, deltas in by_frontend.items():
            self._send_frontend(ident, p.EngineOutputs(deltas=deltas))

    # -- workers (handshake, results, liveness, recovery: scheduler/worker_link.py) ------
    def _can_step(self) -> bool:
        return self.scheduler is not None and self.in_flight is None and self.workers.complete

    def _announce_info(self) -> None:
        for ident in list(self.frontends):
            self._send_frontend(ident, self._info_for(ident))

    def _start_step(self) -> None:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return
        frame = self.encoder.encode(plan)
        self.in_flight = plan
        self.step_stats.on_plan(plan)
        self._plan_timing = (started, time.perf_counter())  # the schedule phase: started .. sent
        for rank, ident in self.workers.identities():
            try:
                self.worker_sock.send_multipart([ident, frame])
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                if self.workers.size > 1:  # the ranks that got the plan fail it, in their first collective
                    self._fail_group(rank, "unreachable", failed_step=plan.step_id,
                                     error=f"rank {rank} cannot be reached")
                else:  # the only rank never got it: recompute, fail nothing, suspect nobody
                    self._fail_group(rank, "unreachable", delivered=False)
                return

    # -- visibility ---------------------------------------------------------------
    def stats(self) -> dict:
        """The Scheduler's gauges and counters plus throughput, step times and derived rates."""
        stats = dict(self.scheduler.stats()) if self.scheduler is not None else {}
        stats.update(self.step_stats.figures())
        hits, queried = stats.get("prefix_cache_hit_tokens"), stats.get("prefix_cache_queried_tokens")
        if hits is not None and queried is not None and "prefix_cache_hit_rate" not in stats:
            # Since start: of the prompt tokens looked up in the prefix cache, the share found there.
            stats["prefix_cache_hit_rate"] = round(hits / queried, 4) if queried else 0.0
        stats["workers_ready"] = self.workers.ready_count()
        stats["draining"] = self._drain_deadline is not None
        return stats

    def stats_reply(self) -> dict:
        """`stats()` plus the per-batch-size decode phase totals (too long for every log line)."""
        return {**self.stats(), "decode_phases": self.step_stats.phase_totals()}

    def _log_stats(self) -> None:
        """Every interval while there is work; when idle, once more and then every IDLE_STATS_EVERY."""
        now = time.monotonic()
        self._next_stats_at = now + self.config.scheduler.stats_interval_s
        if self.scheduler is None:
            return
        self.step_stats.sample(now, self.scheduler.stats().get("tokens_generated", 0))
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
