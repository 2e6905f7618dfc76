"""The frontend's parts without sockets or a model: the request table, what the scheduler's
EngineInfo means (readiness, refusal, limits), intake's typed errors, streaming and completion,
holding and resubmitting across a scheduler restart."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from frontend.engine_status import EngineStatus
from frontend.intake import Intake
from frontend.requests import RequestTable
from frontend.resubmit import Resubmitter
from frontend.streams import ResponseStreamer
from shared import protocol as p
from shared.config import ServerConfig
from shared.drain import Drain
from shared.protocol import ErrorCode
from shared.validation import Rejected

VOCAB = 100


def info(**kw) -> p.EngineInfo:
    facts = dict(ready=True, model="m", max_model_len=64, vocab_size=VOCAB, block_size=4, num_device_blocks=32,
                 workers_ready=1, workers_expected=1, scheduler_id="s1", max_num_batched_tokens=64)
    return p.EngineInfo(**(facts | kw))


class FakeTokenizer:
    """One token per character (ord % VOCAB); decodes back to characters."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def encode_chat(self, messages):
        raise ValueError("this model has no chat template: send a prompt instead of messages")

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    def __init__(self):
        self.sent: list = []

    async def abort(self, request_ids):
        if request_ids:
            self.sent.append(p.AbortRequests(request_ids=list(request_ids)))

    async def finish_outputs(self, outputs):
        self.sent.append(p.FinishOutputs(outputs=outputs))

    async def send(self, msg):
        self.sent.append(msg)


class FakeClients:
    def __init__(self):
        self.sent: list[tuple[bytes, object]] = []

    async def send(self, client, msg):
        self.sent.append((client, msg))


class Parts:
    def __init__(self, max_client_requests=1024, max_waiting=4):
        config = ServerConfig.from_settings(max_client_requests=max_client_requests, max_waiting=max_waiting)
        self.drain = Drain(timeout_s=1.0)
        self.table = RequestTable()
        self.status = EngineStatus("tcp://x")
        self.engine, self.clients = FakeEngine(), FakeClients()
        self.intake = Intake(config, FakeTokenizer(), self.table, self.status, self.drain)
        self.streamer = ResponseStreamer(self.table, self.clients, self.engine)
        self.resubmitter = Resubmitter(self.engine, self.table)

    def admit(self, client=b"c", **kw):
        req = self.intake.admit(client, p.Generate(**kw))
        self.table.add(req)
        return req


def run(coro):
    return asyncio.run(coro)


def test_table_finds_by_both_ids_and_counts_per_client():
    parts = Parts()
    parts.status.update(info())
    a, b = parts.admit(b"x", request_id="a", prompt="hi"), parts.admit(b"x", request_id="b", prompt="hi")
    assert parts.table.count_of(b"x") == 2 and parts.table.clients() == [b"x"]
    parts.table.rename(a, "a#1")
    assert parts.table.by_engine_id("a") is None and parts.table.by_engine_id("a#1") is a
    assert parts.table.id_in_use("a#1") and parts.table.id_in_use("a")
    assert parts.table.forget(a) and not parts.table.forget(a)
    assert parts.table.forget(b)
    assert len(parts.table) == 0 and parts.table.clients() == [] and not parts.table.id_in_use("a#1")


def test_intake_answers_each_bad_request_with_a_typed_error():
    parts = Parts(max_client_requests=1)

    def code_of(client=b"c", **kw):
        with pytest.raises(Rejected) as e:
            parts.admit(client, **kw)
        return e.value.code, e.value.message

    assert code_of(request_id="r", prompt="hi")[0] == ErrorCode.UNAVAILABLE  # never ready yet
    parts.status.update(info())
    assert code_of(request_id="r", prompt="hi", prompt_token_ids=[1])[0] == ErrorCode.INVALID_REQUEST
    assert code_of(request_id="r", prompt="")[0] == ErrorCode.INVALID_REQUEST
    assert "chat template" in code_of(request_id="r", messages=[p.ChatMessage(role="user", content="x")])[1]
    code, message = code_of(request_id="r", prompt_token_ids=[1, VOCAB])
    assert code == ErrorCode.INVALID_REQUEST and "vocabulary" in message
    assert "top_p" in code_of(request_id="r", prompt="hi", params=p.SamplingParams(top_p=0.0))[1]
    assert "max_tokens" in code_of(request_id="r", prompt="hi", params=p.SamplingParams(max_tokens=-1))[1]
    assert code_of(request_id="r", prompt="x" * 60, params=p.SamplingParams(max_tokens=8))[0] == ErrorCode.TOO_LONG
    parts.admit(request_id="r", prompt="hi")
    assert code_of(b"other", request_id="r", prompt="hi")[0] == ErrorCode.INVALID_REQUEST  # id in flight
    assert code_of(request_id="r2", prompt="hi")[0] == ErrorCode.OVERLOADED  # max_client_requests
    parts.drain.handle_signal()
    parts.drain.poll()
    assert code_of(b"other", request_id="r3", prompt="hi")[0] == ErrorCode.SHUTTING_DOWN


def test_limits_come_from_the_scheduler_and_an_old_one_without_a_step_budget_means_max_model_len():
    parts = Parts()
    parts.status.update(info(num_device_blocks=4))  # 16 tokens of KV cache
    with pytest.raises(Rejected) as e:
        parts.admit(request_id="r", prompt="x" * 10, params=p.SamplingParams(max_tokens=10))
    assert e.value.code == ErrorCode.TOO_LONG and "KV blocks" in e.value.message
    parts.status.update(info(max_num_batched_tokens=0, enable_chunked_prefill=False))
    assert parts.status.limits().max_num_batched_tokens == 64
    parts.admit(request_id="r", prompt="x" * 10, params=p.SamplingParams(max_tokens=10))


def test_a_refusing_scheduler_leaves_the_frontend_unready_and_is_logged_once_per_reason():
    parts = Parts()
    with capture_logs() as logs:
        for _ in range(3):
            parts.status.update(info(refusal="protocol version 2 is not 3"))
        parts.status.update(info(refusal="another reason"))
    refused = [e for e in logs if e["event"] == "frontend.refused_by_scheduler"]
    assert [e["reason"] for e in refused] == ["protocol version 2 is not 3", "another reason"]
    assert not parts.status.ready and not parts.status.ever_ready
    with pytest.raises(Rejected) as e:
        parts.admit(request_id="r", prompt="hi")
    assert e.value.code == ErrorCode.UNAVAILABLE and "another reason" in e.value.message
    assert parts.status.health(draining=False) == "starting"
    parts.status.update(info())
    assert parts.status.ready and parts.status.health(draining=False) == "ok"


def test_a_stop_string_finishes_its_output_and_the_request_completes():
    parts = Parts()
    parts.status.update(info())
    req = parts.admit(request_id="r", prompt="hi", stream=True, params=p.SamplingParams(n=2, stop=["!"]))

    async def main():
        await parts.streamer.on_delta(p.TokenDelta("r", 0, [ord("o"), ord("k"), ord("!")]))
        await parts.streamer.on_delta(p.TokenDelta("r", 0, [ord("z")]))  # after its stop: dropped
        await parts.streamer.on_delta(p.TokenDelta("r", 1, [ord("y")], finish_reason="length"))

    run(main())
    assert parts.engine.sent == [p.FinishOutputs(outputs=[("r", 0)])]
    msgs = [m for _, m in parts.clients.sent]
    assert [type(m) for m in msgs] == [p.Delta, p.Delta, p.Completion]
    done = msgs[-1]
    assert [o.text for o in done.outputs] == ["ok", "y"]
    assert [o.finish_reason for o in done.outputs] == ["stop", "length"]
    assert req not in parts.table and parts.streamer.finished == 1


def test_a_new_scheduler_gets_the_held_requests_with_their_tokens_under_new_engine_ids():
    parts = Parts()
    parts.resubmitter.notice(info())
    parts.status.update(info())
    req = parts.admit(request_id="r", prompt="hi", params=p.SamplingParams(max_tokens=8))

    async def main():
        await parts.streamer.on_delta(p.TokenDelta("r", 0, [5, 6]))
        restarted = info(scheduler_id="s2", ready=False)
        parts.resubmitter.notice(restarted)
        parts.status.update(restarted)
        assert req.held and not parts.status.ready
        late = parts.admit(request_id="late", prompt="yo")  # accepted while recovering, held
        parts.resubmitter.hold(late)
        parts.resubmitter.notice(info(scheduler_id="s2"))
        parts.status.update(info(scheduler_id="s2"))
        await parts.resubmitter.resubmit_held()
        return late

    late = run(main())
    abort, *adds = parts.engine.sent
    assert abort == p.AbortRequests(request_ids=["r", "late"])
    assert [(a.request_id, a.output_token_ids) for a in adds] == [("r#1", [[5, 6]]), ("late#1", [])]
    assert not req.held and not late.held
    assert parts.table.by_engine_id("r") is None and parts.table.by_engine_id("r#1") is req
    run(parts.streamer.on_delta(p.TokenDelta("r", 0, [7])))  # a stale copy's delta: dropped
    assert req.outputs[0].token_ids == [5, 6]


def test_recovering_holds_at_most_max_waiting_new_requests():
    parts = Parts(max_waiting=1)
    parts.status.update(info())
    parts.status.update(info(ready=False))
    parts.resubmitter.hold(parts.admit(request_id="a", prompt="hi"))
    with pytest.raises(Rejected) as e:
        parts.admit(request_id="b", prompt="hi")
    assert e.value.code == ErrorCode.OVERLOADED


def test_aborting_a_held_request_completes_it_here_without_telling_the_scheduler():
    parts = Parts()
    parts.status.update(info())
    req = parts.admit(request_id="r", prompt="hi")
    req.held = True
    run(parts.streamer.abort(req))
    assert parts.engine.sent == [] and len(parts.table) == 0
    (_, done), = parts.clients.sent
    assert done.outputs[0].finish_reason == "abort"
