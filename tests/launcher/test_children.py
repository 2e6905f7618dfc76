"""The supervisor's children: readiness over their own NOTIFY_SOCKET, restart back-off, and when
the supervisor gives up instead of restarting."""

from __future__ import annotations

import sys
import time

from launcher.children import BACKOFF_MAX_S, MAX_RESTARTS, Child
from launcher.supervisor import _restartable

SAY_READY_AND_EXIT = """
import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\\nSTATUS=up", os.environ["NOTIFY_SOCKET"])
raise SystemExit(3)
"""


def _wait_exit(child: Child) -> None:
    deadline = time.monotonic() + 30
    while not child.exited():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_child_that_said_ready_is_restarted_with_a_growing_back_off(tmp_path):
    child = Child("worker0", [sys.executable, "-c", SAY_READY_AND_EXIT], {}, str(tmp_path / "w.notify"))
    try:
        child.start()
        _wait_exit(child)
        child.read_notifications()
        assert child.ever_ready and child.proc.returncode == 3
        assert _restartable(child)
        now = time.monotonic()
        delays = [child.schedule_restart(now + i) for i in range(6)]
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, BACKOFF_MAX_S]
        assert child.restart_pending and not child.exited()  # counted once, not again while pending
        assert child.restart_due(now + 5 + BACKOFF_MAX_S) and not child.restart_due(now + 5)
        for i in range(MAX_RESTARTS - 6):
            child.schedule_restart(now + 6 + i)
        assert child.recent_restarts(now + 20) == MAX_RESTARTS and not _restartable(child)
        assert child.recent_restarts(now + 400) == 0  # the window slid past them
    finally:
        child.close()
    assert not (tmp_path / "w.notify").exists()


def test_a_child_that_dies_in_its_first_run_before_ready_stops_the_server(tmp_path):
    child = Child("worker0", [sys.executable, "-c", "raise SystemExit(1)"], {}, str(tmp_path / "w.notify"))
    try:
        child.start()
        _wait_exit(child)
        child.read_notifications()
        assert not child.ever_ready and not _restartable(child)
        child.schedule_restart()  # a restarted run that dies before ready is restarted again
        assert _restartable(child)
    finally:
        child.close()
