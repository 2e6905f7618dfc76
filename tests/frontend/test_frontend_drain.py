"""The frontend's drain (frontend/main.py `_drain`, driving shared/drain.py): it waits for the
requests in flight, and aborts what is left at the deadline or on a second signal."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from frontend.main import _drain
from shared.drain import Drain


class FakeServer:
    def __init__(self, in_flight: list[str]):
        self.table = list(in_flight)  # only len() and truth are read
        self.aborted: list[str] = []

    async def abort_in_flight(self) -> list[str]:
        self.aborted, self.table = self.table, []
        return self.aborted


class FakeNotifier:
    def stopping(self, status: str) -> None:
        self.status = status


def drain_with(server: FakeServer, timeout_s: float, during=None) -> list[dict]:
    async def main():
        signalled = asyncio.Event()
        drain = Drain(timeout_s, on_signal=signalled.set)
        drain.handle_signal()  # the first SIGTERM
        if during is not None:
            asyncio.get_running_loop().call_later(0.1, during, drain, server)
        await asyncio.wait_for(_drain(server, drain, signalled, FakeNotifier()), 10)
        return drain

    with capture_logs() as logs:
        drain = asyncio.run(main())
    assert drain.draining
    return [e for e in logs if e["event"].startswith("frontend.")]


def test_requests_that_finish_in_time_are_not_aborted():
    server = FakeServer(["a"])
    logs = drain_with(server, timeout_s=30, during=lambda drain, srv: srv.table.clear())
    assert [e["event"] for e in logs] == ["frontend.draining"] and server.aborted == []
    assert logs[0]["requests_in_flight"] == 1 and logs[0]["timeout_s"] == 30


def test_the_deadline_aborts_what_is_left():
    server = FakeServer(["a", "b"])
    logs = drain_with(server, timeout_s=0.2)
    assert logs[-1]["event"] == "frontend.drain_aborted" and logs[-1]["cause"] == "drain_timeout"
    assert logs[-1]["request_ids"] == ["a", "b"] == server.aborted


def test_a_second_signal_aborts_at_once():
    server = FakeServer(["a"])
    logs = drain_with(server, timeout_s=30, during=lambda drain, srv: drain.handle_signal())
    assert logs[-1]["event"] == "frontend.drain_aborted" and logs[-1]["cause"] == "second_signal"
    assert server.aborted == ["a"]


def test_an_idle_frontend_stops_at_once():
    server = FakeServer([])
    logs = drain_with(server, timeout_s=30)
    assert [e["event"] for e in logs] == ["frontend.draining"]

