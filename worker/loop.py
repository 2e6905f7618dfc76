"""The worker process: load the model, hand-shake with the scheduler, execute plans.

Policy lives in the scheduler; a worker only executes. Every rank receives the
same plan; rank 0 returns the sampled tokens (worker/model_runner.py keeps the ranks
in lockstep). Any rank that fails a step tells the scheduler (`WorkerError`) and
exits 1: its peers' collectives then fail too, so the whole group goes down, which
the scheduler treats as one failure of the group.

Readiness: the worker is ready (logs `worker.ready`, tells systemd READY=1) once
its weights are loaded, its KV cache is allocated and the scheduler has answered
its `WorkerHello` with a `HelloAck`. A `Shutdown` instead of the ack means the
scheduler refused it: exit 1. The hello is repeated every HELLO_RETRY_S until
answered (the scheduler acknowledges a repeated one again).

Liveness (docs/fault_tolerance.md): whenever the worker has sent nothing for
min(1 s, heartbeat_timeout_s / 4) it sends a `Heartbeat`; results count too. Each
process has its own socket identity, so the scheduler tells a restarted worker
from its dead predecessor. A `Rejoin` (the scheduler dropped us: we hung and woke
up, or the scheduler restarted) makes a single worker forget every sequence and
say hello again; a tensor-parallel rank exits EXIT_REJOIN instead, because its
torch.distributed group must be re-created with its peers.

Stopping: on SIGTERM (or SIGINT) the worker keeps executing plans, because the
scheduler may still be finishing requests, until the scheduler sends `Shutdown`
(exit 0) or drain_timeout_s + DRAIN_MARGIN_S pass (exit 0). A second signal
exits at once. The loop never blocks longer than POLL_MS in recv, so it can ping
systemd's watchdog between plans; a step that hangs stops the pings.
"""

from __future__ import annotations

import time
import uuid

import msgspec
import zmq

from shared import protocol as p
from shared.config import ServerConfig
from shared.drain import Drain
from shared.ipc import make_dealer
from shared.logging import get_logger
from shared.sdnotify import Notifier

log = get_logger()

POLL_MS = 500
DRAIN_MARGIN_S = 5.0  # the scheduler drains for drain_timeout_s, then sends Shutdown: wait a little longer
HELLO_RETRY_S = 5.0
EXIT_REJOIN = 75  # EX_TEMPFAIL: a tensor-parallel rank told to rejoin; restart it (with its peers)


class Interrupted(Exception):
    """A `Shutdown` or `Rejoin` came while a step waited for its grammar masks: the step is
    dropped (the scheduler is stopping, or no longer counts us) and the message acted on."""

    def __init__(self, msg: p.Shutdown | p.Rejoin) -> None:
        super().__init__(type(msg).__name__)
        self.msg = msg


class WorkerLoop:
    def __init__(self, config: ServerConfig):
        from worker.model_runner import ModelRunner  # torch import happens here, after logging is set up

        self.config = config
        self.rank = config.parallel.worker_rank
        self.runner = ModelRunner(config, cancelled=lambda: self.drain.signals > 0)  # a SIGTERM stops the kernel build
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = p.decoder_for(p.PlanMessage)
        self.notifier = Notifier()
        # The scheduler drains for drain_timeout_s, then sends Shutdown: wait a little longer.
        self.drain = Drain(config.operations.drain_timeout_s + DRAIN_MARGIN_S)
        # Heartbeat period: a quarter of the scheduler's timeout, so one lost or late beat is harmless.
        self._beat_every_s = min(1.0, config.scheduler.heartbeat_timeout_s / 4)
        self._last_sent = 0.0  # monotonic seconds of our last message to the scheduler
        self._hello: p.WorkerHello | None = None

    def run(self) -> int:
        self.drain.install()
        self.notifier.status("loading the model")
        self.runner.load()
        if self.drain.signals:
            return self._stopped("signal during start-up")
        hello = self._hello = self.runner.hello()
        ctx = zmq.Context()
        # One identity per process: the scheduler must tell a restarted worker from its predecessor.
        sock = make_dealer(ctx, identity=f"worker-{self.rank}-{uuid.uuid4().hex[:8]}".encode())
        sock.connect(self.config.endpoints.scheduler_addr_for_workers())
        self._send(sock, hello)
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

    def _send(self, sock: zmq.Socket, msg) -> None:
        sock.send(self.encoder.encode(msg))
        self._last_sent = time.monotonic()

    def _await_ack(self, sock: zmq.Socket, rejoining: bool = False) -> int | None:
        """None once the scheduler acknowledged our hello; else the exit code. Watchdog pings
        only when rejoining: before the first READY=1 there must be none."""
        while True:
            if rejoining:
                self.notifier.tick()
            if self.drain.signals:
                return self._stopped("signal before the handshake")
            if time.monotonic() - self._last_sent >= HELLO_RETRY_S:
                self._send(sock, self._hello)  # lost, or sent before the scheduler was up
            if not sock.poll(POLL_MS):
                continue
            msg = self._decode(sock.recv())
            if isinstance(msg, p.HelloAck):
                return None
            if isinstance(msg, p.Shutdown):
                log.error("worker.refused", rank=self.rank, reason=msg.reason)
                return 1
            if isinstance(msg, p.Rejoin):
                continue  # asked before our hello arrived: the hello answers it
            if msg is not None:
                log.error("worker.plan_before_handshake", rank=self.rank)

    def _rejoin(self, sock: zmq.Socket, reason: str) -> int | None:
        """The scheduler dropped us: start over with no sequences. None once rejoined, else the exit code."""
        if self._hello.world_size > 1:
            log.warning("worker.rejoin", rank=self.rank, reason=reason, action="exit")
            return EXIT_REJOIN
        log.warning("worker.rejoin", rank=self.rank, reason=reason, action="hello")
        batch = self.runner.batch
        batch.drop(list(batch.seqs))  # seq ids and block ids mean nothing to the new group
        self._send(sock, self._hello)
        return self._await_ack(sock, rejoining=True)

    def _serve(self, sock: zmq.Socket) -> int:
        while True:
            self.notifier.tick()
            transition = self.drain.poll()
            if transition == "begin":
                log.info("worker.draining", rank=self.rank, timeout_s=self.drain.timeout_s)
                self.notifier.stopping("draining: executing plans until the scheduler says shut down")
            elif transition == "abort":
                if self.drain.abort_cause == "second_signal":
                    return self._stopped("second signal")
                log.warning("worker.drain_timeout", rank=self.rank, timeout_s=self.drain.timeout_s)
                return self._stopped("drain timeout")
            if time.monotonic() - self._last_sent >= self._beat_every_s:
                self._send(sock, p.Heartbeat(rank=self.rank))
            if not sock.poll(min(POLL_MS, int(self._beat_every_s * 1000))):
                continue
            msg = self._decode(sock.recv())
            if msg is None or isinstance(msg, (p.HelloAck, p.StepMasks)):  # masks of a dropped step
                continue
            code = self._act(sock, msg)
            if code is not None:
                return code

    def _act(self, sock: zmq.Socket, msg: p.PlanMessage) -> int | None:
        """Act on one message; the exit code when the worker must stop."""
        while True:
            if isinstance(msg, p.Shutdown):
                log.info("worker.shutdown", rank=self.rank, reason=msg.reason)
                return self._stopped(f"scheduler: {msg.reason}")
            if isinstance(msg, p.Rejoin):
                return self._rejoin(sock, msg.reason)
            try:
                result = self.runner.execute(msg, await_masks=lambda step_id: self._await_masks(sock, step_id))
            except Interrupted as interrupted:
                log.warning("worker.step_interrupted", rank=self.rank, step_id=msg.step_id,
                            by=type(interrupted.msg).__name__)
                msg = interrupted.msg
                continue
            except Exception as e:
                # The scheduler's view of this worker's cache is now unknown: fail loudly, let
                # the supervisor (or systemd) restart us.
                log.exception("worker.step_failed", rank=self.rank, step_id=msg.step_id,
                              seq_ids=[s.seq_id for s in msg.scheduled])
                self._send(sock, p.WorkerError(step_id=msg.step_id, message=repr(e)))
                return 1
            if self.rank == 0:
                self._send(sock, result)
            return None

    def _await_masks(self, sock: zmq.Socket, step_id: int) -> bytes:
        """Step `step_id`'s grammar masks, sent by the scheduler right after its plan (they are
        usually here before the forward ends). Bounded by the scheduler's heartbeat timeout."""
        timeout_s = self.config.scheduler.heartbeat_timeout_s
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            self.notifier.tick()
            if not sock.poll(max(1, min(POLL_MS, int(left_s * 1000)))):
                continue
            msg = self._decode(sock.recv())
            if isinstance(msg, p.StepMasks) and msg.step_id == step_id:
                return msg.bitmask
            if isinstance(msg, (p.Shutdown, p.Rejoin)):
                raise Interrupted(msg)
            log.error("worker.unexpected_message", rank=self.rank, waiting_for="masks", step_id=step_id,
                      got=type(msg).__name__)
        raise TimeoutError(f"the grammar masks of step {step_id} did not come within {timeout_s:.0f} s")

    def _decode(self, frame: bytes) -> p.PlanMessage | None:
        try:
            return self.decoder.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            log.error("worker.bad_frame", rank=self.rank, error=str(e))
            return None

    def _stopped(self, reason: str) -> int:
        if not self.drain.draining:
            self.notifier.stopping(reason)
        log.info("worker.stopped", rank=self.rank, reason=reason)
        return 0


def run_worker(config: ServerConfig) -> int:
    return WorkerLoop(config).run()
