"""Worker failure: the scheduler keeps every request, frees every block, resends everything to
the rejoined worker, and the outputs equal a fault-free run's, with no token streamed twice.

First the `Scheduler` with the fake worker (no sockets, no torch), failing at random steps;
then `WorkerGroup`'s rejoin rules; then the scheduler process with fake workers on ipc
sockets: a silent worker is declared hung, a woken one is asked to rejoin, a restarted one
replaces its predecessor, and planning resumes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import msgspec
import pytest
import zmq
from sched_harness import Harness, add, make_scheduler, reference_output

from scheduler.worker_group import Capacity, WorkerGroup
from shared import protocol as p

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fail_worker(h: Harness, in_flight: bool) -> None:
    """The worker dies: maybe with a step in flight (planned, never answered)."""
    if in_flight and h.scheduler.has_work():
        h.scheduler.schedule()
    h.scheduler.on_worker_restart()
    assert h.scheduler.block_manager.num_used_blocks == 0 and h.scheduler.block_manager.num_used_host_blocks == 0
    assert h.scheduler.block_manager.num_cached_blocks == 0  # the cache died with the worker
    h.scheduler.check_invariants()
    h.worker = type(h.worker)(h.scheduler.block_manager.block_size)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("seed", range(6))
def test_random_worker_failures_lose_and_duplicate_nothing(mode, seed):
    rng = random.Random(seed)
    h = Harness(make_scheduler(num_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=24,
                               num_host_blocks=16, preemption_mode=mode))
    msgs = [add(f"r{i}", [rng.randrange(1, 64) for _ in range(rng.randrange(1, 20))], arrival=float(i),
                max_tokens=rng.randrange(1, 30), seed=rng.randrange(100), n=rng.choice([1, 1, 2]),
                ignore_eos=rng.random() < 0.5)
            for i in range(12)]
    for msg in msgs:
        h.add(msg)
    failures = 0
    steps = 0
    while h.scheduler.has_work():
        if rng.random() < 0.08:
            _fail_worker(h, in_flight=rng.random() < 0.5)
            failures += 1
        elif h.scheduler.has_work():
            h.step()
        steps += 1
        assert steps < 5000
    assert failures > 0
    for msg in msgs:  # Harness.record asserts no delta comes after a finish
        for index in range(msg.params.n):
            tokens, reason = reference_output(msg.prompt_token_ids, msg.params, index, max_model_len=256)
            assert h.outputs[(msg.request_id, index)] == tokens
            assert h.finished[(msg.request_id, index)].finish_reason == reason


def test_the_waiting_queue_is_bounded():
    from shared.config import ServerConfig
    from scheduler.scheduler import Scheduler

    sched = Scheduler(ServerConfig.from_settings(max_waiting=3).scheduler, num_device_blocks=100, block_size=4,
                      max_model_len=64, vocab_size=64, eos_token_ids=[0])
    assert all(sched.add_request(add(f"r{i}", [1, 2], max_tokens=4), b"fe") is None for i in range(3))
    rejected = sched.add_request(add("r3", [1, 2], max_tokens=4), b"fe")
    assert rejected.code == "overloaded" and "max_waiting 3" in rejected.message
    assert sched.stats()["requests_rejected"] == 1 and sched.stats()["requests_in_flight"] == 3


def hello(rank: int = 0, world_size: int = 1, blocks: int = 100, **changes) -> p.WorkerHello:
    base = p.WorkerHello(rank=rank, world_size=world_size, num_device_blocks=blocks, num_host_blocks=0,
                         block_size=16, max_model_len=512, vocab_size=1000, eos_token_ids=[2], model="m",
                         dtype="float32", device="cpu", protocol_version=p.PROTOCOL_VERSION)
    return msgspec.structs.replace(base, **changes)


def test_a_rejoining_group_must_match_the_first_and_hold_its_pools():
    group = WorkerGroup(1)
    group.join(b"a", hello(blocks=100), now=0.0)
    group.reference, group.required = hello(blocks=100), Capacity(100, 0, 512)
    assert group.overdue(5.0, 10.0) is None and group.overdue(11.0, 10.0) == (0, 11.0)
    assert group.dissolve() == [(0, b"a")]
    assert group.failed and group.ready_count() == 0 and group.overdue(100.0, 10.0) is None
    assert "fewer than the 100" in group.refusal(hello(blocks=99))
    assert "model 'other'" in group.refusal(hello(blocks=200, model="other"))
    assert group.refusal(hello(blocks=200)) is None  # more room than needed is fine
    group.join(b"b", hello(blocks=200), now=1.0)
    assert not group.failed and group.ready_count() == 1


class FakeWorkers:
    """The scheduler process with a short heartbeat timeout, fake workers, one fake frontend."""

    def __init__(self, run_dir: str, timeout_s: float = 1.5):
        self.run_dir = run_dir
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "scheduler", "--run-dir", run_dir,
                                      "--heartbeat-timeout", str(timeout_s), "--drain-timeout", "1",
                                      "--stats-interval-s", "60"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.ctx = zmq.Context()
        self.frontend = self._dealer(b"fe", "scheduler-frontend.sock")
        self.plans = p.decoder_for(p.PlanMessage)
        self.outputs = p.decoder_for(p.SchedulerMessage)

    def _dealer(self, ident: bytes, name: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, ident)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{self.run_dir}/{name}")
        return sock

    def worker(self, ident: bytes) -> zmq.Socket:
        return self._dealer(ident, "scheduler-worker.sock")

    def recv(self, sock: zmq.Socket, timeout_ms: int = 20_000):
        """The next message on `sock`, or None after `timeout_ms`; the frontend's `KvEvents`
        (routing reports every 0.1 s, scheduler/kv_events.py) are skipped."""
        while True:
            if not sock.poll(timeout_ms):
                return None
            msg = (self.outputs if sock is self.frontend else self.plans).decode(sock.recv())
            if not isinstance(msg, p.KvEvents):
                return msg

    def recv_kind(self, sock: zmq.Socket, kind, timeout_ms: int = 20_000):
        """The next message of `kind`, skipping others (EngineInfo updates, say)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            msg = self.recv(sock, max(1, int((deadline - time.monotonic()) * 1000)))
            if isinstance(msg, kind):
                return msg
        raise AssertionError(f"no {kind.__name__} within {timeout_ms} ms")

    def close(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.ctx.destroy(linger=0)
        return code


def _answer(fw: FakeWorkers, sock: zmq.Socket, plan: p.StepPlan, token: int) -> None:
    sock.send(p.encode(p.StepResult(plan.step_id, [token] * len(plan.scheduled))))


def test_a_hung_worker_is_dropped_asked_to_rejoin_and_the_request_resumes(tmp_path):
    fw = FakeWorkers(str(tmp_path))
    try:
        w = fw.worker(b"w-1")
        w.send(p.encode(hello()))
        assert isinstance(fw.recv(w), p.HelloAck)
        fw.frontend.send(p.encode(p.FrontendHello("fe", protocol_version=p.PROTOCOL_VERSION)))
        assert fw.recv(fw.frontend).ready
        params = p.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        fw.frontend.send(p.encode(p.AddRequest("a", [5, 6, 7], params, arrival_time=0.0)))
        plan = fw.recv_kind(w, p.StepPlan)
        _answer(fw, w, plan, 11)
        assert [d.token_ids for d in fw.recv_kind(fw.frontend, p.EngineOutputs).deltas] == [[11]]
        plan = fw.recv_kind(w, p.StepPlan)  # ... and the worker hangs on it: silent past the timeout
        deadline = time.monotonic() + 10
        while True:  # a frontend learns of it from its pings' answers
            fw.frontend.send(p.encode(p.FrontendHello("fe", protocol_version=p.PROTOCOL_VERSION)))
            info = fw.recv_kind(fw.frontend, p.EngineInfo)
            if info.workers_ready == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert info.ready and info.workers_ready == 0
        _answer(fw, w, plan, 12)  # it wakes up: its late result is not taken ...
        assert isinstance(fw.recv_kind(w, p.Rejoin), p.Rejoin)  # ... it is asked to say hello again
        w.send(p.encode(hello()))
        assert isinstance(fw.recv_kind(w, p.HelloAck), p.HelloAck)
        plan = fw.recv_kind(w, p.StepPlan)
        # Everything again, the token already streamed included; nothing to drop on a fresh worker.
        assert [(n.token_ids, n.prompt_len) for n in plan.new_seqs] == [([5, 6, 7, 11], 3)]
        assert plan.finished_seq_ids == []
        for token in (13, 14):
            _answer(fw, w, plan, token)
            deltas = fw.recv_kind(fw.frontend, p.EngineOutputs).deltas
            assert [d.token_ids for d in deltas] == [[token]]
            if token == 13:
                plan = fw.recv_kind(w, p.StepPlan)
        assert deltas[0].finish_reason == "length" and deltas[0].num_preemptions == 1
    finally:
        assert fw.close() == 0


def test_a_restarted_worker_replaces_its_predecessor_at_once(tmp_path):
    fw = FakeWorkers(str(tmp_path), timeout_s=60.0)
    try:
        old = fw.worker(b"w-old")
        old.send(p.encode(hello()))
        assert isinstance(fw.recv(old), p.HelloAck)
        fw.frontend.send(p.encode(p.FrontendHello("fe", protocol_version=p.PROTOCOL_VERSION)))
        assert fw.recv(fw.frontend).ready
        params = p.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        fw.frontend.send(p.encode(p.AddRequest("a", [5, 6, 7], params, arrival_time=0.0)))
        fw.recv_kind(old, p.StepPlan)  # in flight when it "dies"
        old.close()
        new = fw.worker(b"w-new")
        new.send(p.encode(hello(blocks=50)))  # too small for the block tables: refused
        assert "fewer than the 100" in fw.recv_kind(new, p.Shutdown).reason
        new.send(p.encode(hello()))
        assert isinstance(fw.recv_kind(new, p.HelloAck), p.HelloAck)
        plan = fw.recv_kind(new, p.StepPlan)
        assert [n.token_ids for n in plan.new_seqs] == [[5, 6, 7]]
        _answer(fw, new, plan, 21)
        plan = fw.recv_kind(new, p.StepPlan)
        _answer(fw, new, plan, 22)
        tokens = []
        while len(tokens) < 2:
            tokens += [t for d in fw.recv_kind(fw.frontend, p.EngineOutputs).deltas for t in d.token_ids]
        assert tokens == [21, 22]
    finally:
        assert fw.close() == 0
