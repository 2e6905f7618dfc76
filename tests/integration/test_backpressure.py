"""Backpressure: 64 clients x 8 requests on a tiny KV cache and a short waiting queue: past the
bound a request gets `overloaded` (never silence), the client retries, and in the end every
request has exactly one answer, the same tokens for the same prompt (docs/fault_tolerance.md)."""

from __future__ import annotations

import random
import time

import pytest
import zmq
from server_process import ServerProcess
from test_fault_tolerance import PROMPTS
from test_operations import check_events_against_docs

from shared import protocol as p
from shared.client import Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow


class RawClient:
    """A DEALER that counts every answer per request id, retrying `overloaded` ones."""

    def __init__(self, ctx: zmq.Context, address: str, name: str, prompts: list[str]):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.requests = {f"{name}-{i}": prompt for i, prompt in enumerate(prompts)}
        self.completions: dict[str, list[p.Completion]] = {rid: [] for rid in self.requests}
        self.other: list = []  # errors other than overloaded, messages after completion
        self.overloaded = 0
        self.retry_at: dict[str, float] = {}

    def send(self, rid: str) -> None:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        self.sock.send(p.encode(p.Generate(request_id=rid, prompt=self.requests[rid], params=params)))

    def on_message(self, msg) -> None:
        if isinstance(msg, p.KeepAlive):
            return
        if isinstance(msg, p.ErrorReply) and msg.code == "overloaded" and not self.completions[msg.request_id]:
            self.overloaded += 1
            self.retry_at[msg.request_id] = time.monotonic() + 1.0 + random.random()
        elif isinstance(msg, p.Completion) and msg.request_id in self.completions:
            self.completions[msg.request_id].append(msg)
        else:
            self.other.append(msg)

    @property
    def done(self) -> bool:
        return all(self.completions.values()) and not self.retry_at


def test_64_clients_x_8_requests_on_a_tiny_cache_none_lost_none_twice(tmp_path):
    srv = ServerProcess(str(tmp_path / "run"), "--num-kv-blocks", "16", "--max-waiting", "48",
                        "--max-num-seqs", "32")
    ctx = zmq.Context()
    decoder = p.decoder_for(p.ServerMessage)
    try:
        clients = [RawClient(ctx, srv.address, f"c{i}", [PROMPTS[(i + j) % 8] for j in range(8)])
                   for i in range(64)]
        poller = zmq.Poller()
        for c in clients:
            poller.register(c.sock, zmq.POLLIN)
            for rid in c.requests:
                c.send(rid)
        by_sock = {c.sock: c for c in clients}
        deadline = time.monotonic() + 600
        while not all(c.done for c in clients):
            assert time.monotonic() < deadline, "requests lost"
            for sock, _ in poller.poll(50):
                while sock.poll(0):
                    by_sock[sock].on_message(decoder.decode(sock.recv()))
            now = time.monotonic()
            for c in clients:
                for rid, at in list(c.retry_at.items()):
                    if now >= at:
                        del c.retry_at[rid]
                        c.send(rid)
        end = time.monotonic() + 2.0  # anything answered twice would arrive by now
        while time.monotonic() < end:
            for sock, _ in poller.poll(100):
                while sock.poll(0):
                    by_sock[sock].on_message(decoder.decode(sock.recv()))
        with Client(srv.address) as c:
            stats = c.stats()
    finally:
        ctx.destroy(linger=0)
        srv.stop()
    assert all(len(done) == 1 for c in clients for done in c.completions.values())
    assert [m for c in clients for m in c.other] == []
    assert sum(c.overloaded for c in clients) > 0, "the bound was never reached"
    by_prompt: dict[str, set[tuple[int, ...]]] = {}
    for c in clients:
        for rid, (done,) in c.completions.items():
            assert done.finish_reason == "length" and len(done.token_ids) == 8
            by_prompt.setdefault(c.requests[rid], set()).add(tuple(done.token_ids))
    assert all(len(outputs) == 1 for outputs in by_prompt.values()), "the same prompt, other tokens"
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0
    assert stats["requests_rejected"] == sum(c.overloaded for c in clients)
    assert stats["kv_blocks_total"] == 16
    check_events_against_docs(srv.events)
