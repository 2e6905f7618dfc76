"""The scheduler's side of its worker group: handshake, plans out, results in, liveness, recovery.

The loop (scheduler/loop.py) owns the socket and hands this link every frame from
a worker; the link decides what it means for the group and for the `Scheduler`,
which it creates once every rank has joined (its pools are the smallest rank's).

Failure (docs/fault_tolerance.md). The group fails as one when any rank
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
from collections.abc import Callable

import msgspec

from scheduler.request_table import Outputs
from scheduler.router import Router
from scheduler.scheduler import Scheduler
from scheduler.step_stats import StepStats
from scheduler.worker_group import Capacity, WorkerGroup
from shared import protocol as p
from shared.config import SchedulerConfig
from shared.logging import get_logger
from shared.sdnotify import Notifier

log = get_logger()

REJOIN_EVERY_S = 2.0  # at most one Rejoin per unknown worker identity this often
_MAX_STRANGERS = 256  # identities remembered for that throttle


class WorkerLink:
    """Owns the `WorkerGroup`, the `Scheduler` (None until the first group is whole) and the
    Rejoin throttle. `send_deltas` takes the token deltas for the frontends; `on_ready` is
    called once the engine is ready (the frontends are told). Times: `time.monotonic()`
    seconds for liveness, `time.perf_counter()` seconds for step phases (`step_stats`)."""

    def __init__(self, router: Router, group: WorkerGroup, *, config: SchedulerConfig, step_stats: StepStats,
                 notifier: Notifier, send_deltas: Callable[[Outputs], None], on_ready: Callable[[], None],
                 wake: Callable[[], None] = lambda: None) -> None:
        self.router = router
        self.group = group
        self.config = config
        self.step_stats = step_stats
        self.notifier = notifier
        self.send_deltas = send_deltas
        self.on_ready = on_ready
        self.wake = wake  # given to the Scheduler: its grammar compiler's threads wake the loop
        self._scheduler: Scheduler | None = None
        self._decoder = p.decoder_for(p.WorkerMessage)
        self._rejoin_sent: dict[bytes, float] = {}  # identity -> monotonic seconds of its last Rejoin
        # A step's cycle, as its sequences see it between two tokens (perf_counter seconds): from
        # planning it to its result, plus applying the step before (updates, deltas sent).
        self._step_started: tuple[int, float] = (-1, 0.0)  # (step id, when its planning began)
        self._last_apply_s = 0.0

    @property
    def scheduler(self) -> Scheduler | None:
        return self._scheduler

    def engine_info(self) -> p.EngineInfo:
        """What the frontends must know, less what the frontend link adds (scheduler id, drops)."""
        sched, group = self._scheduler, self.group
        if sched is None:
            return p.EngineInfo(ready=False, workers_expected=group.size)
        first, pools = group.reference, group.required
        return p.EngineInfo(ready=True, model=first.model, max_model_len=pools.max_model_len,
                            vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
                            block_size=first.block_size, num_device_blocks=pools.num_device_blocks,
                            workers_ready=group.ready_count(), workers_expected=group.size,
                            max_num_batched_tokens=sched.limits.max_num_batched_tokens,
                            enable_chunked_prefill=sched.limits.enable_chunked_prefill,
                            kv_cache_bytes=first.memory.get("kv_cache_bytes", 0),
                            needs_tokenizer=sched.structured.needs_tokenizer)

    # -- messages -------------------------------------------------------------------
    def receive(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = self._decoder.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            log.error("scheduler.bad_worker_frame", error=str(e))
            return
        if isinstance(msg, p.WorkerHello):
            self._on_hello(ident, msg)
            return
        rank = self.group.rank_of(ident)
        if rank is None:
            self._on_stranger(ident, msg)
            return
        self.group.touch(rank, time.monotonic())
        if isinstance(msg, p.StepResult):
            self._on_result(rank, msg)
        elif isinstance(msg, p.WorkerError):
            self._fail_group(rank, "worker_error", failed_step=msg.step_id, error=msg.message)
        # A Heartbeat only refreshes last_seen.

    def _on_result(self, rank: int, msg: p.StepResult) -> None:
        plan = self._scheduler.in_flight if self._scheduler is not None else None
        if rank != 0 or plan is None or plan.step_id != msg.step_id:  # only rank 0 answers the step in flight
            log.error("scheduler.unexpected_result", step_id=msg.step_id, rank=rank)
            return
        received = time.perf_counter()
        step_id, started = self._step_started
        cycle_s = received - started + self._last_apply_s if step_id == msg.step_id else None
        self.send_deltas(self._scheduler.update(msg, cycle_s))
        applied = time.perf_counter()
        self._last_apply_s = applied - received
        self.step_stats.on_result(plan, msg, received=received, applied=applied)

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
        self._send(ident, p.Rejoin(reason="this worker is not a member of the scheduler's group"))

    def _on_hello(self, ident: bytes, hello: p.WorkerHello) -> None:
        refusal = self.group.refusal(hello)
        if refusal is not None:
            log.error("scheduler.worker_rejected", rank=hello.rank, world_size=hello.world_size,
                      expected=self.group.size, reason=refusal)
            self._send(ident, p.Shutdown(reason=refusal))
            return
        if self.group.rank_of(ident) == hello.rank:  # the same process repeated its hello
            self._send(ident, p.HelloAck(rank=hello.rank))
            return
        if self.group.complete and self._scheduler is not None:
            # A new process for a serving rank: the old one is gone, and its KV cache with it.
            self._fail_group(hello.rank, "rank_restarted")
        self.group.join(ident, hello, time.monotonic())
        self._rejoin_sent.pop(ident, None)
        self._send(ident, p.HelloAck(rank=hello.rank))
        log.info("scheduler.worker_joined", rank=hello.rank, device_blocks=hello.num_device_blocks,
                 block_size=hello.block_size, max_model_len=hello.max_model_len,
                 workers_joined=len(self.group.members), workers_expected=self.group.size)
        if self.group.complete:
            if self._scheduler is None:
                self._start_scheduler()
            else:
                self._resume()

    def _send(self, ident: bytes, msg) -> None:
        if not self.router.send(ident, msg):
            log.warning("scheduler.worker_gone", worker=ident.decode(errors="replace"))

    # -- steps ----------------------------------------------------------------------
    def ready_to_step(self) -> bool:
        """A plan may go now: the group is whole, no step is in flight, and there is work."""
        sched = self._scheduler
        return sched is not None and sched.in_flight is None and self.group.complete and sched.has_work()

    def start_step(self) -> None:
        """Plan the next step and send it to every rank; then its grammar masks (if any) to rank 0,
        computed while the ranks run the forward."""
        started = time.perf_counter()
        plan = self._scheduler.schedule()
        if not plan.scheduled:
            return
        frame = self.router.encode(plan)
        self._step_started = (plan.step_id, started)
        self.step_stats.on_plan(plan, started=started, sent=time.perf_counter())
        for rank, ident in self.group.identities():
            if self.router.send_frame(ident, frame):
                continue
            if self.group.size > 1:  # the ranks that got the plan fail it, in their first collective
                self._fail_group(rank, "unreachable", failed_step=plan.step_id, error=f"rank {rank} cannot be reached")
            else:  # the only rank never got it: recompute, fail nothing, suspect nobody
                self._fail_group(rank, "unreachable", delivered=False)
            return
        masks = self._scheduler.step_masks(plan)
        if masks is not None:
            rank, ident = next(iter(self.group.identities()))
            if not self.router.send(ident, masks):  # it got the plan: it fails the step waiting for these
                self._fail_group(rank, "unreachable", failed_step=plan.step_id, error="rank 0 cannot be reached")

    def shut_down(self, reason: str) -> None:
        """Tell every member to exit."""
        for _, ident in self.group.identities():
            self._send(ident, p.Shutdown(reason=reason))

    # -- the group ------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        """Every rank joined: size the pools by the smallest rank's capacity."""
        first, cap = self.group.first_hello(), self.group.capacity()
        self._scheduler = Scheduler(self.config, num_device_blocks=cap.num_device_blocks,
                                    block_size=first.block_size, max_model_len=cap.max_model_len,
                                    vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
                                    num_host_blocks=cap.num_host_blocks, wake=self.wake)
        self.group.reference = first
        self.group.required = Capacity(cap.num_device_blocks, cap.num_host_blocks, cap.max_model_len)
        log.info("scheduler.ready", kv_blocks=cap.num_device_blocks, host_blocks=cap.num_host_blocks,
                 block_size=first.block_size, max_model_len=cap.max_model_len, workers=self.group.size)
        self.notifier.status(f"ready: {self.group.size} worker(s), {cap.num_device_blocks} KV blocks")
        self.on_ready()

    def _resume(self) -> None:
        """A dissolved group is whole again: plans flow from the next loop turn."""
        stats = self._scheduler.stats()
        log.info("scheduler.worker_group_rejoined", workers=self.group.size, failures=self.group.generation,
                 requests_in_flight=stats["requests_in_flight"], waiting=stats["waiting"])
        self.notifier.status(f"ready again: {self.group.size} worker(s) rejoined")

    def _fail_group(self, rank: int | None, cause: str, *, failed_step: int | None = None, error: str = "",
                    silent_s: float | None = None, delivered: bool = True) -> None:
        """The group lost its state (see the module docstring). `failed_step`: the step a rank
        reported failing (its requests finish with "error" if it is the one in flight).
        Otherwise the step in flight, if `delivered`, makes its sequences suspects
        (scheduler/isolation.py). Frontends see the failure in the answer to their next ping
        (`engine_info`: workers_ready 0, health degraded)."""
        sched = self._scheduler
        plan = sched.in_flight if sched is not None else None
        if failed_step is not None:
            outputs = sched.fail_step(failed_step) if sched is not None else []
            log.error("scheduler.worker_error", rank=rank, step_id=failed_step, error=error,
                      request_ids=sorted({delta.request_id for _, delta in outputs}))
            self.send_deltas(outputs)
        self.group.dissolve()
        in_flight, convicted = 0, []
        if sched is not None:
            # The rest: preempted by recompute, every block freed; a repeat suspect fails.
            convicted = sched.on_worker_restart(blame_in_flight=failed_step is None and delivered)
            in_flight = sched.stats()["requests_in_flight"]
        extra = {"silent_s": round(silent_s, 3)} if silent_s is not None else {}
        log.error("scheduler.worker_group_failed", rank=rank, step_id=plan.step_id if plan else failed_step,
                  workers=self.group.size, cause=cause, requests_kept=in_flight,
                  requests_failed=sorted({delta.request_id for _, delta in convicted}), **extra)
        self.send_deltas(convicted)
        self.notifier.status(f"worker group failed (rank {rank}, {cause}); waiting for it to rejoin")

    def check_liveness(self) -> None:
        """Called every loop turn (at most the loop's idle poll apart)."""
        if self._scheduler is None:
            return
        overdue = self.group.overdue(time.monotonic(), self.config.heartbeat_timeout_s)
        if overdue is not None:
            rank, silent_s = overdue
            self._fail_group(rank, "heartbeat_timeout", silent_s=silent_s)
