"""The scheduler process: sockets around the `Scheduler`.

Two ROUTER sockets: frontends connect to one, workers to the other. One step is
in flight at a time: plan -> every rank -> rank 0's result -> token deltas to
the frontends. Until every rank has said hello there is no `Scheduler` (its
pool size is the smallest rank's capacity), and frontends are told `ready=False`.

The ranks of a tensor-parallel group are one worker to everything here but the
handshake (worker/parallel.py splits the model; rank 0 alone answers). A rank
that fails (a `WorkerError` from any rank, or a plan it can no longer be sent)
fails the group: the step in flight fails as a one-rank worker's would, and no
plan goes to the group again. Taking a restarted group back is the
fault-tolerance work's (`Scheduler.on_worker_restart`); until then the requests
left wait.

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

import msgspec
import zmq

from scheduler.scheduler import Scheduler
from scheduler.step_stats import StepStats
from scheduler.worker_group import WorkerGroup
from shared import protocol as p
from shared.config import ServerConfig
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
        self.encoder = msgspec.msgpack.Encoder()
        self.frontend_decoder = p.decoder_for(p.FrontendMessage)
        self.worker_decoder = p.decoder_for(p.WorkerMessage)
        self.frontends: set[bytes] = set()
        self.workers = WorkerGroup(config.tensor_parallel_size)
        self.scheduler: Scheduler | None = None
        self.in_flight: p.StepPlan | None = None
        self._plan_timing = (0.0, 0.0)  # perf_counter seconds: the in-flight plan's schedule start, and its send
        self.info = p.EngineInfo(ready=False, workers_expected=config.tensor_parallel_size)
        self._next_stats_at = time.monotonic() + config.stats_interval_s
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
        bind(self.frontend_sock, self.config.frontend_addr())
        bind(self.worker_sock, self.config.worker_addr())
        log.info("scheduler.listening", frontends=self.config.frontend_addr(), workers=self.config.worker_addr(),
                 workers_expected=self.config.tensor_parallel_size)
        self.notifier.ready(f"listening; waiting for {self.config.tensor_parallel_size} worker(s)")
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
                self._drain_deadline = time.monotonic() + self.config.drain_timeout_s
                in_flight = self.scheduler.stats()["requests_in_flight"] if self.scheduler else 0
                log.info("scheduler.draining", requests_in_flight=in_flight, timeout_s=self.config.drain_timeout_s)
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
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("scheduler.bad_frontend_frame", error=str(e))
            return
        if isinstance(msg, p.FrontendHello):
            self.frontends.add(ident)
            self._send_frontend(ident, self.info)
        elif isinstance(msg, p.AddRequest):
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

    def _send_frontend(self, ident: bytes, msg) -> None:
        try:
            self.frontend_sock.send_multipart([ident, self.encoder.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.frontends.discard(ident)
            # Its requests can no longer be answered: free their blocks. (Their finishing
            # deltas go nowhere, which is fine: the frontend is gone.)
            request_ids = self.scheduler.abort_frontend(ident) if self.scheduler is not None else []
            log.warning("scheduler.frontend_gone", frontend=ident.decode(errors="replace"), request_ids=request_ids)

    def _send_deltas(self, outputs: list[tuple[bytes, p.TokenDelta]]) -> None:
        by_frontend: dict[bytes, list[p.TokenDelta]] = collections.defaultdict(list)
        for ident, delta in outputs:
            by_frontend[ident].append(delta)
        for ident, deltas in by_frontend.items():
            self._send_frontend(ident, p.EngineOutputs(deltas=deltas))

    # -- workers ------------------------------------------------------------------
    def _can_step(self) -> bool:
        return self.scheduler is not None and self.in_flight is None and not self.workers.failed

    def _on_worker(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = self.worker_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("scheduler.bad_worker_frame", error=str(e))
            return
        if isinstance(msg, p.WorkerHello):
            self._on_hello(ident, msg)
        elif isinstance(msg, p.StepResult):
            if self.workers.rank_of(ident) != 0:  # only rank 0 answers; anything else is a stray
                log.error("scheduler.unexpected_result", step_id=msg.step_id, rank=self.workers.rank_of(ident))
                return
            plan, self.in_flight = self.in_flight, None
            if plan is None or plan.step_id != msg.step_id:
                log.error("scheduler.unexpected_result", step_id=msg.step_id, rank=0)
                return
            received = time.perf_counter()
            self.step_stats.on_result(msg)
            self._send_deltas(self.scheduler.update(plan, msg))
            started, sent = self._plan_timing
            self.step_stats.on_step_timing(plan, msg, schedule_s=sent - started, round_trip_s=received - sent,
                                           update_s=time.perf_counter() - received)
        elif isinstance(msg, p.WorkerError):
            self._on_group_failure(self.workers.rank_of(ident), msg.step_id, msg.message)

    def _on_group_failure(self, rank: int | None, step_id: int, error: str) -> None:
        """A rank failed `step_id` (its peers usually follow, failing the same step). Fail that
        step's requests if it is the one in flight; then stop planning for the group."""
        plan = self.in_flight
        outputs = []
        if plan is not None and plan.step_id == step_id and self.scheduler is not None:
            self.in_flight = None
            outputs = self.scheduler.fail_step(plan)
        log.error("scheduler.worker_error", rank=rank, step_id=step_id, error=error,
                  request_ids=sorted({delta.request_id for _, delta in outputs}))
        self._send_deltas(outputs)
        if not self.workers.failed:
            self.workers.failed = True
            log.error("scheduler.worker_group_failed", rank=rank, step_id=step_id,
                      workers=self.config.tensor_parallel_size)
            self.notifier.status(f"worker group failed (rank {rank}); waiting for a restart")

    def _on_hello(self, ident: bytes, hello: p.WorkerHello) -> None:
        refusal = self.workers.refusal(hello)
        if refusal is not None:
            log.error("scheduler.worker_rejected", rank=hello.rank, world_size=hello.world_size,
                      expected=self.config.tensor_parallel_size, reason=refusal)
            self._send_worker(ident, p.Shutdown(reason=refusal))
            return
        if self.scheduler is not None:
            # Recovery of a restarted worker (re-sending full state) is the fault-tolerance issue's.
            log.error("scheduler.worker_rejoined_unsupported", rank=hello.rank)
            self._send_worker(ident, p.Shutdown(reason="the scheduler cannot take a worker back yet: "
                                                       "restart the scheduler"))
            return
        self.workers.join(ident, hello)
        self._send_worker(ident, p.HelloAck(rank=hello.rank))
        log.info("scheduler.worker_joined", rank=hello.rank, device_blocks=hello.num_device_blocks,
                 block_size=hello.block_size, max_model_len=hello.max_model_len,
                 workers_joined=len(self.workers.members), workers_expected=self.workers.size)
        if self.workers.complete:
            self._start_scheduler()

    def _start_scheduler(self) -> None:
        """Every rank joined: size the pools by the smallest rank's capacity."""
        first, cap = self.workers.first_hello(), self.workers.capacity()
        self.scheduler = Scheduler(self.config, num_device_blocks=cap.num_device_blocks,
                                   block_size=first.block_size, max_model_len=cap.max_model_len,
                                   vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
                                   num_host_blocks=cap.num_host_blocks)
        self.info = p.EngineInfo(ready=True, model=first.model, max_model_len=cap.max_model_len,
                                 vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
                                 block_size=first.block_size, num_device_blocks=cap.num_device_blocks,
                                 workers_ready=self.workers.size, workers_expected=self.workers.size)
        log.info("scheduler.ready", kv_blocks=cap.num_device_blocks, host_blocks=cap.num_host_blocks,
                 block_size=first.block_size, max_model_len=cap.max_model_len, workers=self.workers.size)
        self.notifier.status(f"ready: {self.workers.size} worker(s), {cap.num_device_blocks} KV blocks")
        for ident in list(self.frontends):
            self._send_frontend(ident, self.info)

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
                # The ranks that got the plan fail it too, in their first collective.
                self._on_group_failure(rank, plan.step_id, f"rank {rank} cannot be reached")
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
        self._next_stats_at = now + self.config.stats_interval_s
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
