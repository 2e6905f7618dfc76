"""A flood of 10,000 requests from one client (docs/fault_tolerance.md, "Backpressure"): the
flooding client gets an answer to each (tokens, or `overloaded` past its share), another
client meanwhile gets the right tokens with no error, and neither the frontend's nor the
scheduler's memory grows without bound. A frame over the size bound costs its sender the
connection, nobody else anything. (A client that stops reading: tests/frontend/test_slow_client.py.)"""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from server_process import ServerProcess
from test_bad_input import _rss_bytes

from shared import protocol as p
from shared.client import Client, RequestError
from shared.ipc import MAX_FRAME_BYTES
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

FLOOD = 10_000
PER_CLIENT = 64
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(str(tmp_path_factory.mktemp("run")), "--max-model-len", "256",
                           "--max-client-requests", str(PER_CLIENT), "--max-waiting", "256")
    yield server
    server.stop()


def _flooder(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    return sock


def test_ten_thousand_requests_from_one_client_leave_the_others_alone(srv):
    with Client(srv.address) as c:
        expected = c.generate("The capital of France is", GREEDY).token_ids
    pids = {role: srv.child_pid(role) for role in ("frontend", "scheduler")}
    rss_before = {role: _rss_bytes(pid) for role, pid in pids.items()}

    sock = _flooder(srv.address)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i in range(FLOOD):
        sock.send(p.encode(p.Generate(request_id=f"f{i}", prompt_token_ids=[1 + i % 500, 2, 3], params=params)))

    others: list = []

    def other_client():  # while the flood is being answered
        with Client(srv.address) as c:
            for _ in range(3):
                others.append(c.generate("The capital of France is", GREEDY).token_ids)

    thread = threading.Thread(target=other_client)
    thread.start()

    decoder = p.decoder_for(p.ServerMessage)
    answers: dict[str, object] = {}
    deadline = time.monotonic() + 600
    while len(answers) < FLOOD:
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"{len(answers)} of {FLOOD} answered"
        reply = decoder.decode(sock.recv())
        if isinstance(reply, p.KeepAlive):
            continue
        assert reply.request_id not in answers, f"{reply.request_id} answered twice"
        answers[reply.request_id] = reply
    thread.join(timeout=600)
    sock.close()

    assert others == [expected] * 3, "the other client was refused or got wrong tokens"
    served = [r for r in answers.values() if isinstance(r, p.Completion)]
    refused = [r for r in answers.values() if isinstance(r, p.ErrorReply)]
    assert len(served) + len(refused) == FLOOD
    assert {r.code for r in refused} == {"overloaded"}
    assert len(served) >= PER_CLIENT and all(len(r.token_ids) == 2 for r in served)
    for role, pid in pids.items():
        assert _rss_bytes(pid) - rss_before[role] < 300 * 2**20, f"the {role}'s memory grew"
    with Client(srv.address) as c:
        stats = c.stats()
        assert c.health()["status"] == "ok"
    assert stats["requests_in_flight"] == 0 and stats["kv_blocks_used"] == 0
    assert stats["frontend_requests_in_flight"] == 0



def test_a_frame_over_the_size_bound_costs_its_sender_the_connection_only(srv):
    """ZMQ_MAXMSGSIZE: the frontend never allocates the frame; it closes that connection (which
    reconnects by itself), others are served. The SDK refuses such a request itself, typed."""
    raw = _flooder(srv.address)
    raw.send(b"\x91" + b"\x00" * MAX_FRAME_BYTES)
    with Client(srv.address) as c:
        assert len(c.generate("The capital of France is", GREEDY).token_ids) == 6
        with pytest.raises(RequestError) as refused:
            c.generate("a" * MAX_FRAME_BYTES, GREEDY)
        assert refused.value.code == "invalid_request"
    deadline = time.monotonic() + 60
    decoder = p.decoder_for(p.ServerMessage)
    while True:  # the raw socket reconnected: a well-formed message on it is answered
        raw.send(p.encode(p.HealthCheck(request_id="h")))
        if raw.poll(2000):
            assert isinstance(decoder.decode(raw.recv()), p.HealthReply)
            break
        assert time.monotonic() < deadline, "the connection never came back"
    raw.close()
