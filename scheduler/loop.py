"""The scheduler process: sockets around the `Scheduler`.

Two ROUTER sockets: frontends connect to one, workers to the other. One step is
in flight at a time: plan -> every rank -> rank 0's result -> token deltas to
the frontends. Until every rank has said hello there is no `Scheduler` (its
pool size is the smallest rank's capacity), and frontends are told `ready=False`.
"""

from __future__ import annotations

import collections
import time

import msgspec
import zmq

from scheduler.scheduler import Scheduler
from shared import protocol as p
from shared.config import ServerConfig
from shared.ipc import bind, make_router
from shared.logging import get_logger

log = get_logger()

IDLE_POLL_MS = 200
IDLE_STATS_EVERY_S = 300.0  # an idle server still says it is alive, but rarely


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
        self.workers: dict[int, tuple[bytes, p.WorkerHello]] = {}  # rank -> (identity, hello)
        self.scheduler: Scheduler | None = None
        self.in_flight: p.StepPlan | None = None
        self.info = p.EngineInfo(ready=False, workers_expected=config.tensor_parallel_size)
        self._next_stats_at = time.monotonic() + config.stats_interval_s
        self._step_times: collections.deque[float] = collections.deque(maxlen=1000)
        self._last_logged_steps: int | None = None
        self._last_stats_log = float("-inf")

    # -- main loop ------------------------------------------------------------
    def run(self) -> None:
        bind(self.frontend_sock, self.config.frontend_addr())
        bind(self.worker_sock, self.config.worker_addr())
        log.info("scheduler.listening", frontends=self.config.frontend_addr(), workers=self.config.worker_addr(),
                 workers_expected=self.config.tensor_parallel_size)
        poller = zmq.Poller()
        poller.register(self.frontend_sock, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        while True:
            busy = self.scheduler is not None and self.in_flight is None and self.scheduler.has_work()
            events = dict(poller.poll(0 if busy else IDLE_POLL_MS))
            if self.worker_sock in events:
                self._drain(self.worker_sock, self._on_worker)
            if self.frontend_sock in events:
                self._drain(self.frontend_sock, self._on_frontend)
            if self.scheduler is not None and self.in_flight is None and self.scheduler.has_work():
                self._start_step()
            if time.monotonic() >= self._next_stats_at:
                self._log_stats()

    def _drain(self, sock: zmq.Socket, handle) -> None:
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
        elif isinstance(msg, p.StatsQuery):
            self._send_frontend(ident, p.StatsResult(query_id=msg.query_id, stats=self.stats()))

    def _send_frontend(self, ident: bytes, msg) -> None:
        try:
            self.frontend_sock.send_multipart([ident, self.encoder.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("scheduler.frontend_gone", frontend=ident.decode(errors="replace"))
            self.frontends.discard(ident)

    def _send_deltas(self, outputs: list[tuple[bytes, p.TokenDelta]]) -> None:
        by_frontend: dict[bytes, list[p.TokenDelta]] = collections.defaultdict(list)
        for ident, delta in outputs:
            by_frontend[ident].append(delta)
        for ident, deltas in by_frontend.items():
            self._send_frontend(ident, p.EngineOutputs(deltas=deltas))

    # -- workers ------------------------------------------------------------------
    def _on_worker(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = self.worker_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("scheduler.bad_worker_frame", error=str(e))
            return
        if isinstance(msg, p.WorkerHello):
            self._on_hello(ident, msg)
        elif isinstance(msg, p.StepResult):
            plan, self.in_flight = self.in_flight, None
            if plan is None or plan.step_id != msg.step_id:
                log.error("scheduler.unexpected_result", step_id=msg.step_id)
                return
            self._step_times.append(msg.step_time_s)
            self._send_deltas(self.scheduler.update(plan, msg))
        elif isinstance(msg, p.WorkerError):
            log.error("scheduler.worker_error", step_id=msg.step_id, error=msg.message)
            plan, self.in_flight = self.in_flight, None
            if plan is not None and self.scheduler is not None:
                self._send_deltas(self.scheduler.fail_step(plan))

    def _on_hello(self, ident: bytes, hello: p.WorkerHello) -> None:
        if hello.world_size != self.config.tensor_parallel_size:
            log.error("scheduler.worker_rejected", rank=hello.rank, world_size=hello.world_size,
                      expected=self.config.tensor_parallel_size)
            return
        if self.scheduler is not None:
            # Recovery of a restarted worker (re-sending full state) is the fault-tolerance issue's.
            log.error("scheduler.worker_rejoined_unsupported", rank=hello.rank)
            return
        self.workers[hello.rank] = (ident, hello)
        log.info("scheduler.worker_joined", rank=hello.rank, device_blocks=hello.num_device_blocks,
                 block_size=hello.block_size, max_model_len=hello.max_model_len)
        if len(self.workers) == self.config.tensor_parallel_size:
            self._start_scheduler()

    def _start_scheduler(self) -> None:
        hellos = [h for _, h in self.workers.values()]
        first = hellos[0]
        num_blocks = min(h.num_device_blocks for h in hellos)
        max_model_len = min(h.max_model_len for h in hellos)
        self.scheduler = Scheduler(self.config, num_device_blocks=num_blocks, block_size=first.block_size,
                                   max_model_len=max_model_len, vocab_size=first.vocab_size,
                                   eos_token_ids=first.eos_token_ids)
        self.info = p.EngineInfo(ready=True, model=first.model, max_model_len=max_model_len,
                                 vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
                                 block_size=first.block_size, num_device_blocks=num_blocks,
                                 workers_ready=len(hellos), workers_expected=self.config.tensor_parallel_size)
        log.info("scheduler.ready", kv_blocks=num_blocks, block_size=first.block_size, max_model_len=max_model_len,
                 workers=len(hellos))
        for ident in list(self.frontends):
            self._send_frontend(ident, self.info)

    def _start_step(self) -> None:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return
        frame = self.encoder.encode(plan)
        for ident, _ in self.workers.values():
            self.worker_sock.send_multipart([ident, frame])
        self.in_flight = plan

    # -- visibility ---------------------------------------------------------------
    def stats(self) -> dict:
        stats = dict(self.scheduler.stats()) if self.scheduler is not None else {}
        times = sorted(self._step_times)
        if times:
            stats["step_time_p50_s"] = times[len(times) // 2]
            stats["step_time_p99_s"] = times[min(len(times) - 1, int(len(times) * 0.99))]
        stats["workers_ready"] = len(self.workers)
        return stats

    def _log_stats(self) -> None:
        """Every interval while there is work; when idle, once more and then every IDLE_STATS_EVERY."""
        now = time.monotonic()
        self._next_stats_at = now + self.config.stats_interval_s
        if self.scheduler is None:
            return
        stats = self.stats()
        idle = stats.get("requests_in_flight", 0) == 0 and stats.get("steps") == self._last_logged_steps
        if idle and now - self._last_stats_log < IDLE_STATS_EVERY_S:
            return
        self._last_logged_steps, self._last_stats_log = stats.get("steps"), now
        log.info("scheduler.stats", **stats)


def run_scheduler(config: ServerConfig) -> int:
    SchedulerLoop(config).run()
    return 0
