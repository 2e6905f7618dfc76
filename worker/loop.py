"""The worker process: load the model, hand-shake with the scheduler, execute plans.

Policy lives in the scheduler; a worker only executes. Every rank receives the
same plan; rank 0 returns the sampled tokens (worker/model_runner.py keeps the ranks
in lockstep). Any rank that fails a step tells the scheduler (`WorkerError`) and
exits 1: its peers' collectives then fail too, so the whole group goes down, which
the scheduler treats as one failure of the group.

Readiness: the worker is ready (logs `worker.ready`, tells systemd READY=1) once
its weights are loaded, its KV cache is allocated and the scheduler has answered
its `WorkerHello` with a `HelloAck`. A `Shutdown` instead of the ack means the
scheduler refused it: exit 1.

Stopping: on SIGTERM (or SIGINT) the worker keeps executing plans, because the
scheduler may still be finishing requests, until the scheduler sends `Shutdown`
(exit 0) or drain_timeout_s + DRAIN_MARGIN_S pass (exit 0). A second signal
exits at once. The loop never blocks longer than POLL_MS in recv, so it can ping
systemd's watchdog between plans; a step that hangs stops the pings.
"""

from __future__ import annotations

import signal
import time

import msgspec
import zmq

from shared import protocol as p
from shared.config import ServerConfig
from shared.ipc import make_dealer
from shared.logging import get_logger
from shared.sdnotify import Notifier

log = get_logger()

POLL_MS = 500
DRAIN_MARGIN_S = 5.0  # the scheduler drains for drain_timeout_s, then sends Shutdown: wait a little longer


class WorkerLoop:
    def __init__(self, config: ServerConfig):
        from worker.model_runner import ModelRunner  # torch import happens here, after logging is set up

        self.config = config
        self.rank = config.worker_rank
        self.runner = ModelRunner(config)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = p.decoder_for(p.PlanMessage)
        self.notifier = Notifier()
        self.signals = 0  # SIGTERM/SIGINT received
        self._signals_seen = 0
        self._drain_deadline: float | None = None  # monotonic seconds

    def _on_signal(self, _signum, _frame) -> None:
        self.signals += 1

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.notifier.status("loading the model")
        self.runner.load()
        if self.signals:
            return self._stopped("signal during start-up")
        hello = self.runner.hello()
        ctx = zmq.Context()
        sock = make_dealer(ctx, identity=f"worker-{self.rank}".encode())
        sock.connect(self.config.worker_addr())
        sock.send(self.encoder.encode(hello))
        self.notifier.status(f"KV cache allocated ({hello.num_device_blocks} blocks); waiting for the scheduler")
        try:
            refused = self._await_ack(sock)
            if refused is not None:
                return refused
            log.info("worker.ready", rank=self.rank, tensor_parallel_size=hello.world_size, device=hello.device,
                     dtype=hello.dtype, model=hello.model,
                     kv_blocks=hello.num_device_blocks, block_size=hello.block_size, **hello.memory)
            self.notifier.ready(f"ready: rank {self.rank}, {hello.num_device_blocks} KV blocks")
            code = self._serve(sock)
            if code == 0:
                self.runner.close()  # a clean stop leaves the group; a failed rank just exits
            return code
        finally:
            sock.close(linger=0)
            ctx.term()

    def _await_ack(self, sock: zmq.Socket) -> int | None:
        """None once the scheduler acknowledged our hello; else the exit code."""
        while True:
            if self.signals:
                return self._stopped("signal before the handshake")
            if not sock.poll(POLL_MS):
                continue
            msg = self._decode(sock.recv())
            if isinstance(msg, p.HelloAck):
                return None
            if isinstance(msg, p.Shutdown):
                log.error("worker.refused", rank=self.rank, reason=msg.reason)
                return 1
            if msg is not None:
                log.error("worker.plan_before_handshake", rank=self.rank)

    def _serve(self, sock: zmq.Socket) -> int:
        while True:
            self.notifier.tick()
            if self.signals != self._signals_seen:
                if self._signals_seen or self.signals > 1:
                    return self._stopped("second signal")
                self._signals_seen = self.signals
                self._begin_drain()
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                log.warning("worker.drain_timeout", rank=self.rank,
                            timeout_s=self.config.drain_timeout_s + DRAIN_MARGIN_S)
                return self._stopped("drain timeout")
            if not sock.poll(POLL_MS):
                continue
            msg = self._decode(sock.recv())
            if msg is None or isinstance(msg, p.HelloAck):
                continue
            if isinstance(msg, p.Shutdown):
                log.info("worker.shutdown", rank=self.rank, reason=msg.reason)
                return self._stopped(f"scheduler: {msg.reason}")
            try:
                result = self.runner.execute(msg)
            except Exception as e:
                # The scheduler's view of this worker's cache is now unknown: fail loudly, let
                # the supervisor (or systemd) restart us.
                log.exception("worker.step_failed", rank=self.rank, step_id=msg.step_id,
                              seq_ids=[s.seq_id for s in msg.scheduled])
                sock.send(self.encoder.encode(p.WorkerError(step_id=msg.step_id, message=repr(e))))
                return 1
            if self.rank == 0:
                sock.send(self.encoder.encode(result))

    def _decode(self, frame: bytes) -> p.PlanMessage | None:
        try:
            return self.decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("worker.bad_frame", rank=self.rank, error=str(e))
            return None

    def _begin_drain(self) -> None:
        timeout_s = self.config.drain_timeout_s + DRAIN_MARGIN_S
        self._drain_deadline = time.monotonic() + timeout_s
        log.info("worker.draining", rank=self.rank, timeout_s=timeout_s)
        self.notifier.stopping("draining: executing plans until the scheduler says shut down")

    def _stopped(self, reason: str) -> int:
        if self._drain_deadline is None:
            self.notifier.stopping(reason)
        log.info("worker.stopped", rank=self.rank, reason=reason)
        return 0


def run_worker(config: ServerConfig) -> int:
    return WorkerLoop(config).run()
