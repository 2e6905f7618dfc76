"""The scheduler with a tensor-parallel group: handshake from every rank, capacity = the
smallest, the same plan to every rank, rank 0's result only, a rank's failure = the group's.

`WorkerGroup` alone, then the real scheduler process with fake ranks and a fake frontend on
ipc sockets (no torch, a few seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import msgspec
import pytest
import zmq

from scheduler.worker_group import WorkerGroup
from shared import protocol as p

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hello(rank: int, world_size: int = 2, blocks: int = 100, **changes) -> p.WorkerHello:
    base = p.WorkerHello(rank=rank, world_size=world_size, num_device_blocks=blocks, num_host_blocks=10 + rank,
                         block_size=16, max_model_len=512, vocab_size=1000, eos_token_ids=[2], model="m",
                         dtype="float32", device="cpu", protocol_version=p.PROTOCOL_VERSION)
    return msgspec.structs.replace(base, **changes)


def test_capacity_is_the_smallest_ranks():
    group = WorkerGroup(3)
    for rank, blocks in ((2, 70), (0, 90), (1, 80)):
        assert group.refusal(hello(rank, 3, blocks)) is None
        group.join(f"w{rank}".encode(), hello(rank, 3, blocks))
    assert group.complete
    cap = group.capacity()
    assert (cap.num_device_blocks, cap.num_host_blocks, cap.max_model_len) == (70, 10, 512)
    assert group.identities() == [(0, b"w0"), (1, b"w1"), (2, b"w2")]
    assert group.rank_of(b"w2") == 2 and group.rank_of(b"other") is None


@pytest.mark.parametrize("bad, words", [
    (hello(0, world_size=3), "world size 3"),
    (hello(2), "rank 2 is outside [0, 2)"),
    (hello(1, model="other"), "model 'other'"),
    (hello(1, block_size=32), "block_size 32"),
    (hello(1, vocab_size=999), "vocab_size 999"),
])
def test_a_hello_that_does_not_fit_the_group_is_refused(bad, words):
    group = WorkerGroup(2)
    group.join(b"w0", hello(0))
    assert words in group.refusal(bad)


class FakeGroup:
    """The scheduler process, `size` fake ranks and one fake frontend."""

    def __init__(self, run_dir: str, size: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "scheduler", "--run-dir", run_dir,
                                      "--tensor-parallel-size", str(size), "--drain-timeout", "1",
                                      "--stats-interval-s", "60"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.ctx = zmq.Context()
        self.ranks = []
        for rank in range(size):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, f"worker-{rank}".encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{run_dir}/scheduler-worker.sock")
            self.ranks.append(sock)
        self.frontend = self.ctx.socket(zmq.DEALER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.connect(f"ipc://{run_dir}/scheduler-frontend.sock")
        self.plans = p.decoder_for(p.PlanMessage)
        self.outputs = p.decoder_for(p.SchedulerMessage)

    def recv(self, sock: zmq.Socket, timeout_ms: int = 20_000):
        """The next message on `sock`, or None after `timeout_ms`. The frontend's `KvEvents` (routing
        reports, every 0.1 s: scheduler/kv_events.py) are skipped."""
        while True:
            if not sock.poll(timeout_ms):
                return None
            msg = (self.outputs if sock is self.frontend else self.plans).decode(sock.recv())
            if not isinstance(msg, p.KvEvents):
                return msg

    def close(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        for sock in (*self.ranks, self.frontend):
            sock.close()
        self.ctx.term()
        return code


def test_every_rank_gets_every_plan_rank_0_answers_and_one_failure_fails_the_group(tmp_path):
    g = FakeGroup(str(tmp_path), 2)
    try:
        g.ranks[1].send(p.encode(hello(1, blocks=40)))  # the smaller rank: the pools' size
        assert isinstance(g.recv(g.ranks[1]), p.HelloAck)
        g.frontend.send(p.encode(p.FrontendHello("fe", protocol_version=p.PROTOCOL_VERSION)))
        assert g.recv(g.frontend).ready is False  # one rank of two
        g.ranks[0].send(p.encode(hello(0, blocks=100)))
        assert isinstance(g.recv(g.ranks[0]), p.HelloAck)
        info = g.recv(g.frontend)
        assert info.ready and info.num_device_blocks == 40 and info.workers_ready == 2

        params = p.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        g.frontend.send(p.encode(p.AddRequest("a", [5, 6, 7], params, arrival_time=0.0)))
        first = [g.recv(sock) for sock in g.ranks]
        assert first[0] == first[1] and isinstance(first[0], p.StepPlan)
        g.ranks[1].send(p.encode(p.StepResult(first[0].step_id, [9])))  # not rank 0's: ignored
        g.ranks[0].send(p.encode(p.StepResult(first[0].step_id, [11])))
        deltas = g.recv(g.frontend).deltas
        assert [d.token_ids for d in deltas] == [[11]]

        second = [g.recv(sock) for sock in g.ranks]
        assert second[0] == second[1] and second[0].step_id != first[0].step_id
        g.ranks[1].send(p.encode(p.WorkerError(second[0].step_id, "gloo: connection closed by peer")))
        deltas = g.recv(g.frontend).deltas
        assert [(d.request_id, d.finish_reason) for d in deltas] == [("a", "error")]
        g.ranks[0].send(p.encode(p.WorkerError(second[0].step_id, "rank 0 too")))  # the same step: no-op

        g.frontend.send(p.encode(p.AddRequest("b", [5, 6, 7], params, arrival_time=1.0)))
        assert [g.recv(sock, 1000) for sock in g.ranks] == [None, None], "a failed group gets no plans"
        g.frontend.send(p.encode(p.StatsQuery("q")))
        assert g.recv(g.frontend).stats["workers_ready"] == 0
    finally:
        code = g.close()
    assert code == 0


def test_peers_of_another_protocol_version_are_refused_by_the_process(tmp_path):
    g = FakeGroup(str(tmp_path), 1)
    try:
        g.ranks[0].send(p.encode(hello(0, world_size=1, protocol_version=1)))
        refused = g.recv(g.ranks[0])
        assert isinstance(refused, p.Shutdown) and "protocol version 1" in refused.reason
        g.frontend.send(p.encode(p.FrontendHello("fe")))  # version 1
        info = g.recv(g.frontend)
        assert not info.ready and "protocol version 1" in info.refusal
        assert f"version {p.PROTOCOL_VERSION}" in info.refusal
        g.frontend.send(p.encode(p.StatsQuery("q")))
        assert g.recv(g.frontend, 1000) is None, "a refused frontend is not answered"
    finally:
        code = g.close()
    assert code == 0
