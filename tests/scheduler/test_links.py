"""The scheduler process's links, in-process with a fake socket: a peer of another protocol
version is refused (a worker is shut down, a frontend told why and otherwise ignored), and a
ready scheduler's `EngineInfo` carries the limits the frontend validates with."""

from __future__ import annotations

import msgspec
from structlog.testing import capture_logs

from scheduler.frontend_link import FrontendLink
from scheduler.step_stats import StepStats
from scheduler.worker_group import WorkerGroup
from scheduler.worker_link import WorkerLink
from shared import protocol as p
from shared.config import ServerConfig
from shared.sdnotify import Notifier


class FakeRouter:
    """Records what a link sends, decoded; `unreachable` identities fail like ROUTER_MANDATORY."""

    def __init__(self, decode_as):
        self.sent: list[tuple[bytes, object]] = []
        self.unreachable: set[bytes] = set()
        self._decoder = p.decoder_for(decode_as)

    def encode(self, msg) -> bytes:
        return p.encode(msg)

    def send(self, ident: bytes, msg) -> bool:
        return self.send_frame(ident, p.encode(msg))

    def send_frame(self, ident: bytes, frame: bytes) -> bool:
        if ident in self.unreachable:
            return False
        self.sent.append((ident, self._decoder.decode(frame)))
        return True


def hello(rank: int = 0, **changes) -> p.WorkerHello:
    base = p.WorkerHello(rank=rank, world_size=1, num_device_blocks=100, num_host_blocks=0, block_size=16,
                         max_model_len=512, vocab_size=1000, eos_token_ids=[2], model="m", dtype="float32",
                         device="cpu", protocol_version=p.PROTOCOL_VERSION)
    return msgspec.structs.replace(base, **changes)


def worker_link(**settings) -> tuple[WorkerLink, FakeRouter, list]:
    router, ready = FakeRouter(p.PlanMessage), []
    link = WorkerLink(router, WorkerGroup(1), config=ServerConfig.from_settings(**settings).scheduler,
                      step_stats=StepStats(), notifier=Notifier({}), send_deltas=lambda outputs: None,
                      on_ready=lambda: ready.append(True))
    return link, router, ready


def frontend_link(engine_info=lambda: p.EngineInfo(ready=False)) -> tuple[FrontendLink, FakeRouter]:
    router = FakeRouter(p.SchedulerMessage)
    return FrontendLink(router, scheduler_id="sched-1", engine_info=engine_info,
                        abort_frontend=lambda ident: []), router


def test_a_worker_of_another_protocol_version_is_shut_down():
    link, router, ready = worker_link()
    with capture_logs() as logs:
        link.receive(b"w-old", p.encode(hello(protocol_version=1)))
    (ident, msg), = router.sent
    assert ident == b"w-old" and isinstance(msg, p.Shutdown)
    assert "protocol version 1" in msg.reason and f"version {p.PROTOCOL_VERSION}" in msg.reason
    (event,) = [e for e in logs if e["event"] == "scheduler.worker_rejected"]
    assert event["reason"] == msg.reason
    assert link.scheduler is None and not link.group.members and not ready


def test_a_frontend_of_another_protocol_version_is_refused_and_otherwise_ignored():
    link, router = frontend_link()
    old_hello = p.encode(p.FrontendHello("fe-old"))  # version 1: no protocol_version field
    with capture_logs() as logs:
        link.receive(b"fe-old", old_hello)
        link.receive(b"fe-old", old_hello)  # it pings every second: answered each time, logged once
        add = p.AddRequest("r", [1, 2], p.SamplingParams(), arrival_time=0.0)
        assert link.receive(b"fe-old", p.encode(add)) is None  # not a known frontend: not acted on
    assert [ident for ident, _ in router.sent] == [b"fe-old", b"fe-old"]
    info = router.sent[0][1]
    assert isinstance(info, p.EngineInfo) and not info.ready and info.scheduler_id == "sched-1"
    assert "protocol version 1" in info.refusal and f"version {p.PROTOCOL_VERSION}" in info.refusal
    refused = [e for e in logs if e["event"] == "scheduler.frontend_refused"]
    assert len(refused) == 1 and refused[0]["protocol_version"] == 1 and refused[0]["expected"] == p.PROTOCOL_VERSION
    assert [e["event"] for e in logs if e["event"] == "scheduler.unknown_frontend"] == ["scheduler.unknown_frontend"]


def test_a_frontend_of_this_version_is_known_and_its_requests_pass_through():
    link, router = frontend_link()
    assert link.receive(b"fe", p.encode(p.FrontendHello("fe", protocol_version=p.PROTOCOL_VERSION))) is None
    (_, info), = router.sent
    assert not info.refusal and info.scheduler_id == "sched-1"
    add = p.AddRequest("r", [1, 2], p.SamplingParams(), arrival_time=0.0)
    assert link.receive(b"fe", p.encode(add)) == add


def test_a_ready_scheduler_tells_frontends_its_limits():
    link, _, ready = worker_link(max_num_batched_tokens=4096, enable_chunked_prefill=False)
    assert link.engine_info() == p.EngineInfo(ready=False, workers_expected=1)
    link.receive(b"w", p.encode(hello()))
    assert ready == [True] and link.scheduler is not None
    info = link.engine_info()
    assert info.ready and info.workers_ready == 1 and info.num_device_blocks == 100 and info.max_model_len == 512
    assert info.max_num_batched_tokens == 4096 and info.enable_chunked_prefill is False
    default, _, _ = worker_link()
    default.receive(b"w", p.encode(hello()))
    info = default.engine_info()  # resolved once, in config: max(max_model_len, 2048)
    assert info.max_num_batched_tokens == 2048 and info.enable_chunked_prefill is True
