"""Bad input on the client socket (hypothesis, 2,000+ frames): garbage bytes, truncated frames,
invalid UTF-8, unknown kinds and fields, wrong types, out-of-range parameters and token ids,
prompts past max_model_len, several frames in one message. Each gets a typed answer to that
client alone; between batches a well-formed request still gets the right tokens; the
frontend's memory stays bounded."""

from __future__ import annotations

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess

from shared import protocol as p
from shared.client import Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

BATCH = 250
EXAMPLES = 2000
CODES = {c.value for c in p.ErrorCode}

KNOWN_KEYS = ["request_id", "params", "prompt", "messages", "prompt_token_ids", "stream", "priority", "kind"]
PARAM_KEYS = ["n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
              "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs",
              "prompt_logprobs", "bogus"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
params = st.dictionaries(st.sampled_from(PARAM_KEYS), st.one_of(values, st.integers(-5, 5), st.floats(-3, 3)),
                         max_size=5)
messages = st.fixed_dictionaries(
    {"kind": st.sampled_from(["generate", "generate", "generate", "abort", "health", "stats", "nope"])},
    optional={"request_id": st.one_of(st.text(max_size=140), values),
              "params": st.one_of(params, values),
              "prompt": st.one_of(st.text(max_size=50), values, st.just("word " * 9000)),
              "prompt_token_ids": st.one_of(st.lists(st.integers(-10, 60000), max_size=20), values),
              "stream": st.one_of(st.booleans(), values),
              "priority": st.one_of(st.integers(-2**63, 2**63 - 1), values),
              "bogus": values})


def _encode(obj) -> bytes:
    try:
        return msgspec.msgpack.encode(obj)
    except (TypeError, OverflowError, ValueError):
        return b"\xc1"


frames = st.one_of(
    st.binary(max_size=300),  # garbage
    messages.map(_encode),
    messages.map(_encode).flatmap(lambda f: st.integers(0, max(0, len(f) - 1)).map(lambda n: f[:n])),  # truncated
    st.binary(min_size=1, max_size=20).map(lambda b: b"\x82\xa4kind\xa8generate\xaarequest_id" +
                                           bytes([0xa0 | min(len(b), 31)]) + b[:31]),  # maybe invalid UTF-8
    st.lists(st.binary(max_size=20), min_size=2, max_size=3),  # several frames in one message
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(str(tmp_path_factory.mktemp("run")), "--max-model-len", "256")
    yield server
    server.stop()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Fuzzer:
    def __init__(self, address: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.client_decoder = p.decoder_for(p.ClientMessage)
        self.server_decoder = p.decoder_for(p.ServerMessage)
        self.sent = 0
        self.answered = 0

    def send(self, frame) -> None:
        parts = frame if isinstance(frame, list) else [frame]
        self.sock.send_multipart(parts)
        self.sent += 1
        try:
            msg = self.client_decoder.decode(parts[0]) if len(parts) == 1 else None
        except (msgspec.DecodeError, UnicodeDecodeError):
            msg = None
        if isinstance(msg, p.Abort):
            return  # an abort of nothing gets no answer
        if isinstance(msg, p.Generate):  # should it be valid, do not wait for it to run to the end
            self.sock.send(p.encode(p.Abort(request_id=msg.request_id)))
        reply = self._recv(30_000)
        assert reply is not None, f"no answer to {parts!r}"
        while isinstance(reply, p.Delta):  # a valid streaming request: its completion follows the abort
            reply = self._recv(30_000)
        if isinstance(reply, p.ErrorReply):
            assert reply.code in CODES, reply
        else:
            assert isinstance(reply, (p.Completion, p.HealthReply, p.StatsReply)), reply
        self.answered += 1

    def _recv(self, timeout_ms: int):
        while self.sock.poll(timeout_ms):
            reply = self.server_decoder.decode(self.sock.recv())
            if not isinstance(reply, p.KeepAlive):
                return reply
        return None

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def test_two_thousand_bad_frames_get_typed_answers_and_the_server_goes_on(srv):
    fuzzer = Fuzzer(srv.address)
    frontend = srv.child_pid("frontend")
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    with Client(srv.address) as c:
        expected = c.generate("The capital of France is", greedy).token_ids
    rss_before = _rss_bytes(frontend)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frames)
    def fuzz(frame):
        fuzzer.send(frame)
        if fuzzer.sent % BATCH == 0:
            with Client(srv.address) as c:
                assert c.generate("The capital of France is", greedy).token_ids == expected

    try:
        fuzz()
    finally:
        fuzzer.close()
    assert fuzzer.sent >= EXAMPLES and fuzzer.answered > EXAMPLES // 2
    assert _rss_bytes(frontend) - rss_before < 200 * 2**20, "the frontend's memory grew"
    with Client(srv.address) as c:
        assert c.health()["status"] == "ok"
        assert c.stats()["kv_blocks_used"] == 0
    assert not srv.named("frontend.internal_error")
