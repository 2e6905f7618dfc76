"""The scheduler's side of its worker group: handshake, results, liveness, recovery.

A mixin of `SchedulerLoop` (scheduler/loop.py), which owns the sockets; this file
decides what a worker's message means for the group.

Failure (DESIGN.md §8). The group fails as one when any rank
* dies: its restarted process says hello again while the group is serving, or it
  falls silent (below);
* hangs: nothing from it for `heartbeat_timeout_s`. A worker sends a `Heartbeat`
  whenever it has sent nothing for a quarter of that, but a step is synchronous,
  so a single step that outlasts the timeout counts as a hang;
* reports a `WorkerError`, or (with tensor parallelism) cannot be sent a plan that
  its peers received.

Then:
1. The failed step's requests finish with "error" when a rank reported failing
   it (the ranks that got a plan a peer could not be sent fail it too, in their
   first collective): the step itself may be what kills workers, and retrying it
   could kill every new one.
2. Every other sequence is preempted by recompute (`Scheduler.on_worker_restart`):
   the step in flight is forgotten (its tokens never reached the frontend), every
   device and host block is freed, and each sequence waits with its generated
   tokens to be prefilled again. Nothing is lost and nothing is streamed twice;
   seeded sampling depends only on (seed, token index), so the tokens that follow
   are those a fault-free run gives.
3. The group is dissolved. Its ranks join again: `serve`'s supervisor (or systemd)
   restarts a dead one; a live one that was dropped (it hung, then woke up; or the
   scheduler restarted) is sent `Rejoin` when it next speaks. Planning resumes once
   the group is whole again; requests keep arriving and wait meanwhile.
"""

from __future__ import annotations

import time

import msgspec

from scheduler.scheduler import Scheduler
from scheduler.worker_group import Capacity
from shared import protocol as p
from shared.logging import get_logger

log = get_logger()

REJOIN_EVERY_S = 2.0  # at most one Rejoin per unknown worker identity this often
_MAX_STRANGERS = 256  # identities remembered for that throttle


class WorkerLink:
    """Needs from the loop: config, workers, scheduler, scheduler_id, in_flight, info, notifier,
    step_stats, _plan_timing, _send_worker, _send_deltas, _announce_info."""

    def _init_worker_link(self) -> None:
        self.worker_decoder = p.decoder_for(p.WorkerMessage)
        self._rejoin_sent: dict[bytes, float] = {}  # identity -> monotonic seconds of its last Rejoin

    # -- messages -------------------------------------------------------------------
    def _on_worker(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = self.worker_decoder.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            log.error("scheduler.bad_worker_frame", error=str(e))
            return
        if isinstance(msg, p.WorkerHello):
            self._on_hello(ident, msg)
            return
        rank = self.workers.rank_of(ident)
        if rank is None:
            self._on_stranger(ident, msg)
            return
        self.workers.touch(rank, time.monotonic())
        if isinstance(msg, p.StepResult):
            self._on_result(rank, msg)
        elif isinstance(msg, p.WorkerError):
            self._fail_group(rank, "worker_error", failed_step=msg.step_id, error=msg.message)
        # A Heartbeat only refreshes last_seen.

    def _on_result(self, rank: int, msg: p.StepResult) -> None:
        if rank != 0:  # only rank 0 answers; anything else is a stray
            log.error("scheduler.unexpected_result", step_id=msg.step_id, rank=rank)
            return
        plan = self.in_flight
        if plan is None or plan.step_id != msg.step_id:
            log.error("scheduler.unexpected_result", step_id=msg.step_id, rank=0)
            return
        self.in_flight = None
        received = time.perf_counter()
        self.step_stats.on_result(msg)
        self._send_deltas(self.scheduler.update(plan, msg))
        started, sent = self._plan_timing
        self.step_stats.on_step_timing(plan, msg, schedule_s=sent - started, round_trip_s=received - sent,
                                       update_s=time.perf_counter() - received)

    def _on_stranger(self, ident: bytes, msg) -> None:
        """A message from no member: a worker dropped from a dissolved group (it hung and woke
        up) or one that served a previous scheduler process. Ask it to join again."""
        if isinstance(msg, p.WorkerError):  # it exits by itself; keep the error for the record
            log.error("scheduler.worker_error", rank=None, step_id=msg.step_id, error=msg.message, request_ids=[])
            return
        now = time.monotonic()
        if now - self._rejoin_sent.get(ident, float("-inf")) < REJOIN_EVERY_S:
            return
        if len(self._rejoin_sent) >= _MAX_STRANGERS:
            self._rejoin_sent.clear()
        self._rejoin_sent[ident] = now
        rank = msg.rank if isinstance(msg, p.Heartbeat) else None
        log.info("scheduler.worker_rejoin_asked", worker=ident.decode(errors="replace"), rank=rank)
        self._send_worker(ident, p.Rejoin(reason="this worker is not a member of the scheduler's group"))

    def _on_hello(self, ident: bytes, hello: p.WorkerHello) -> None:
        refusal = self.workers.refusal(hello)
        if refusal is not None:
            log.error("scheduler.worker_rejected", rank=hello.rank, world_size=hello.world_size,
                      expected=self.config.parallel.tensor_parallel_size, reason=refusal)
            self._send_worker(ident, p.Shutdown(reason=refusal))
            return
        if self.workers.rank_of(ident) == hello.rank:  # the same process repeated its hello
            self._send_worker(ident, p.HelloAck(rank=hello.rank))
            return
        if self.workers.complete and self.scheduler is not None:
            # A new process for a serving rank: the old one is gone, and its KV cache with it.
            self._fail_group(hello.rank, "rank_restarted")
        self.workers.join(ident, hello, time.monotonic())
        self._rejoin_sent.pop(ident, None)
        self._send_worker(ident, p.HelloAck(rank=hello.rank))
        log.info("scheduler.worker_joined", rank=hello.rank, device_blocks=hello.num_device_blocks,
                 block_size=hello.block_size, max_model_len=hello.max_model_len,
                 workers_joined=len(self.workers.members), workers_expected=self.workers.size)
        if self.workers.complete:
            if self.scheduler is None:
                self._start_scheduler()
            else:
                self._resume()

    # -- the group ------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        """Every rank joined: size the pools by the smallest rank's capacity."""
        first, cap = self.workers.first_hello(), self.workers.capacity()
        self.scheduler = Scheduler(self.config, num_device_blocks=cap.num_device_blocks,
                                   block_size=first.block_size, max_model_len=cap.max_model_len,
                                   vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
                                   num_host_blocks=cap.num_host_blocks)
        self.workers.reference = first
        self.workers.required = Capacity(cap.num_device_blocks, cap.num_host_blocks, cap.max_model_len)
        self.info = p.EngineInfo(ready=True, model=first.model, max_model_len=cap.max_model_len,
                                 vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
                                 block_size=first.block_size, num_device_blocks=cap.num_device_blocks,
                                 workers_ready=self.workers.size, workers_expected=self.workers.size,
                                 scheduler_id=self.scheduler_id)
        log.info("scheduler.ready", kv_blocks=cap.num_device_blocks, host_blocks=cap.num_host_blocks,
                 block_size=first.block_size, max_model_len=cap.max_model_len, workers=self.workers.size)
        self.notifier.status(f"ready: {self.workers.size} worker(s), {cap.num_device_blocks} KV blocks")
        self._announce_info()

    def _resume(self) -> None:
        """A dissolved group is whole again: plans flow from the next loop turn."""
        self.info = msgspec.structs.replace(self.info, workers_ready=self.workers.size)
        stats = self.scheduler.stats()
        log.info("scheduler.worker_group_rejoined", workers=self.workers.size, failures=self.workers.generation,
                 requests_in_flight=stats["requests_in_flight"], waiting=stats["waiting"])
        self.notifier.status(f"ready again: {self.workers.size} worker(s) rejoined")

    def _fail_group(self, rank: int | None, cause: str, *, failed_step: int | None = None, error: str = "",
                    silent_s: float | None = None, delivered: bool = True) -> None:
        """The group lost its state (see the module docstring). `failed_step`: the step a rank
        reported failing (its requests finish with "error" if it is the one in flight).
        Otherwise the step in flight, if `delivered`, makes its sequences suspects
        (scheduler/isolation.py)."""
        plan = self.in_flight
        if failed_step is not None:
            outputs = []
            if plan is not None and plan.step_id == failed_step and self.scheduler is not None:
                outputs = self.scheduler.fail_step(plan)
            log.error("scheduler.worker_error", rank=rank, step_id=failed_step, error=error,
                      request_ids=sorted({delta.request_id for _, delta in outputs}))
            self._send_deltas(outputs)
        self.in_flight = None
        self.workers.dissolve()
        in_flight, convicted = 0, []
        if self.scheduler is not None:
            crashed = plan if failed_step is None and delivered else None
            # The rest: preempted by recompute, every block freed; a repeat suspect fails.
            convicted = self.scheduler.on_worker_restart(crashed)
            in_flight = self.scheduler.stats()["requests_in_flight"]
        extra = {"silent_s": round(silent_s, 3)} if silent_s is not None else {}
        log.error("scheduler.worker_group_failed", rank=rank, step_id=plan.step_id if plan else failed_step,
                  workers=self.config.parallel.tensor_parallel_size, cause=cause, requests_kept=in_flight,
                  requests_failed=sorted({delta.request_id for _, delta in convicted}), **extra)
        self._send_deltas(convicted)
        self.notifier.status(f"worker group failed (rank {rank}, {cause}); waiting for it to rejoin")
        if self.info.ready:  # frontends see it in the answer to their next ping (health: degraded)
            self.info = msgspec.structs.replace(self.info, workers_ready=0)

    def _check_liveness(self) -> None:
        """Called every loop turn (at most IDLE_POLL_MS apart)."""
        if self.scheduler is None:
            return
        overdue = self.workers.overdue(time.monotonic(), self.config.scheduler.heartbeat_timeout_s)
        if overdue is not None:
            rank, silent_s = overdue
            self._fail_group(rank, "heartbeat_timeout", silent_s=silent_s)
