"""The scheduler's side of trace context and request timing: `AddRequest.trace_id` on each of the
request's events, and the queue and prefill times on its first token's delta."""

from __future__ import annotations

from sched_harness import EOS, VOCAB, Harness
from structlog.testing import capture_logs

from scheduler.scheduler import Scheduler
from shared import protocol as p
from shared.config import ServerConfig

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock=None, num_blocks=1000, block_size=4, max_num_seqs=128) -> Scheduler:
    config = ServerConfig.from_settings(max_num_seqs=max_num_seqs)
    return Scheduler(config.scheduler, num_device_blocks=num_blocks, block_size=block_size, max_model_len=64,
                     vocab_size=VOCAB, eos_token_ids=[EOS], clock=clock or FakeClock())


def request(rid: str, prompt, trace_id: str = "", priority: int = 0, arrival: float = 0.0, **params) -> p.AddRequest:
    return p.AddRequest(rid, list(prompt), p.SamplingParams(**params), arrival, priority, trace_id=trace_id)


def test_trace_id_survives_the_wire():
    msg = request("r", [1, 2], trace_id=TRACE_ID)
    assert p.decoder_for(p.FrontendMessage).decode(p.encode(msg)).trace_id == TRACE_ID
    plain = request("r", [1, 2])
    assert p.decoder_for(p.FrontendMessage).decode(p.encode(plain)).trace_id == ""


def test_rejected_request_logs_its_trace_id():
    sched = make()
    with capture_logs() as logs:
        assert sched.add_request(request("long", range(1, 80), trace_id=TRACE_ID), b"fe") is not None
        assert sched.add_request(request("plain", range(1, 80)), b"fe") is not None
    rejected = {e["request_id"]: e for e in logs if e["event"] == "request.rejected"}
    assert rejected["long"]["trace_id"] == TRACE_ID
    assert "trace_id" not in rejected["plain"]


def test_preempted_request_logs_its_trace_id():
    # As test_preemption's victim test: c (worst priority, latest) is preempted at the second step.
    h = Harness(make(num_blocks=4, block_size=2))
    h.add(request("a", [1, 2], priority=0, arrival=1.0, max_tokens=2, ignore_eos=True))
    h.add(request("b", [1, 2], priority=1, arrival=0.0, max_tokens=2, ignore_eos=True))
    h.add(request("c", [1, 2], trace_id=TRACE_ID, priority=1, arrival=2.0, max_tokens=2, ignore_eos=True))
    h.step()
    with capture_logs() as logs:
        h.step()
    events = [e for e in logs if e["event"] == "request.preempted"]
    assert [(e["request_id"], e["trace_id"]) for e in events] == [("c", TRACE_ID)]
    h.run()


def test_first_token_delta_carries_queue_and_prefill_times():
    clock = FakeClock()
    sched = make(clock, max_num_seqs=1)
    h = Harness(sched)
    h.add(request("first", [1, 2, 3], max_tokens=3, ignore_eos=True))
    clock.now += 0.5  # the second waits behind the first: one sequence per step
    h.add(request("second", [4, 5, 6], max_tokens=2, ignore_eos=True))
    firsts: dict[str, p.TokenDelta] = {}
    others: list[p.TokenDelta] = []
    while sched.has_work():
        clock.now += 1.0  # scheduling
        plan = sched.schedule()
        h.worker.apply(plan)
        result = h.worker.run(plan)
        clock.now += 0.25  # the step
        for _frontend, delta in sched.update(result):
            if delta.request_id in firsts:
                others.append(delta)
            else:
                firsts[delta.request_id] = delta
    assert (firsts["first"].queue_time_s, firsts["first"].prefill_time_s) == (1.5, 0.25)
    # "second" arrived at 100.5; first scheduled after the first's three steps of 1.25 s, at 105.25.
    assert (firsts["second"].queue_time_s, firsts["second"].prefill_time_s) == (4.75, 0.25)
    assert all(d.queue_time_s is None and d.prefill_time_s is None for d in others)
    assert len(others) == 3


def test_timings_are_omitted_from_the_wire_when_absent():
    plain = p.TokenDelta("r", 0, [1])
    timed = p.TokenDelta("r", 0, [1], queue_time_s=0.5, prefill_time_s=0.25)
    assert len(p.encode(plain)) < len(p.encode(timed))
    assert p.decoder_for(p.SchedulerMessage).decode(p.encode(p.EngineOutputs([timed]))).deltas[0] == timed
