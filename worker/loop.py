"""The worker process: load the model, hand-shake with the scheduler, execute plans.

Policy lives in the scheduler; a worker only executes. Every rank receives the
same plan; rank 0 returns the sampled tokens.
"""

from __future__ import annotations

import msgspec
import zmq

from shared import protocol as p
from shared.config import ServerConfig
from shared.ipc import make_dealer
from shared.logging import get_logger

log = get_logger()


class WorkerLoop:
    def __init__(self, config: ServerConfig):
        from worker.model_runner import ModelRunner  # torch import happens here, after logging is set up

        self.config = config
        self.rank = config.rank
        self.runner = ModelRunner(config)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = p.decoder_for(p.PlanMessage)

    def run(self) -> int:
        self.runner.load()
        hello = self.runner.hello(self.rank, self.config.tensor_parallel_size)
        ctx = zmq.Context()
        sock = make_dealer(ctx, identity=f"worker-{self.rank}".encode())
        sock.connect(self.config.worker_addr())
        sock.send(self.encoder.encode(hello))
        log.info("worker.ready", rank=self.rank, device=hello.device, dtype=hello.dtype, model=hello.model,
                 kv_blocks=hello.num_device_blocks, block_size=hello.block_size, **hello.memory)
        while True:
            frame = sock.recv()
            try:
                msg = self.decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.error("worker.bad_frame", rank=self.rank, error=str(e))
                continue
            if isinstance(msg, p.Shutdown):
                log.info("worker.shutdown", rank=self.rank, reason=msg.reason)
                return 0
            try:
                result = self.runner.execute(msg)
            except Exception as e:
                # The scheduler's view of this worker's cache is now unknown: fail loudly, let
                # the supervisor (or systemd) restart us.
                log.exception("worker.step_failed", rank=self.rank, step_id=msg.step_id)
                sock.send(self.encoder.encode(p.WorkerError(step_id=msg.step_id, message=repr(e))))
                return 1
            if self.rank == 0:
                sock.send(self.encoder.encode(result))


def run_worker(config: ServerConfig) -> int:
    return WorkerLoop(config).run()
