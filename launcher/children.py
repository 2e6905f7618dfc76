"""The supervisor's children: start, restart with back-off, and hear their READY=1.

Each child gets its own NOTIFY_SOCKET, a datagram socket in the run directory, as
systemd gives each unit one; the roles already speak the notify protocol
(shared/sdnotify.py), so READY=1 there tells the supervisor the child came up.
One socket per child means no credentials are needed to tell who spoke.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

from shared.logging import get_logger

log = get_logger()

MAX_RESTARTS = 10  # restarts of one child within RESTART_WINDOW_S before the server gives up
RESTART_WINDOW_S = 300.0
BACKOFF_FIRST_S = 0.5  # the first restart's delay; it doubles with each restart in the window
BACKOFF_MAX_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class Child:
    """One role process and its restarts. Times are monotonic seconds."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], notify_path: str | None):
        self.name, self.argv, self.env = name, argv, env
        self.proc: subprocess.Popen | None = None
        self.ever_ready = False  # some run of it said READY=1
        self.num_restarts = 0
        self._restarts: list[float] = []  # when each restart was scheduled
        self._restart_at: float | None = None
        self._notify: socket.socket | None = None
        if notify_path is not None:
            try:
                if os.path.exists(notify_path):
                    os.unlink(notify_path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                sock.bind(notify_path)
                self._notify, self.env = sock, {**env, "NOTIFY_SOCKET": notify_path}
            except OSError as e:  # e.g. a path too long for AF_UNIX: restart on every death instead
                log.warning("supervisor.no_readiness", child=name, error=str(e))
                self.ever_ready = True

    @property
    def restart_pending(self) -> bool:
        return self._restart_at is not None

    def start(self) -> None:
        self._restart_at = None
        self.proc = subprocess.Popen(self.argv, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL,
                                     env=self.env, process_group=0)

    def exited(self) -> bool:
        """True once when a running child has died (not while a restart is pending)."""
        return not self.restart_pending and self.proc is not None and self.proc.poll() is not None

    def read_notifications(self) -> None:
        while self._notify is not None:
            try:
                data = self._notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if b"READY=1" in data.split(b"\n"):
                self.ever_ready = True

    def recent_restarts(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        return len(self._restarts)

    def schedule_restart(self, now: float | None = None) -> float:
        """Plan a restart after a back-off; returns the delay in seconds."""
        now = time.monotonic() if now is None else now
        delay_s = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** self.recent_restarts(now))
        self._restarts.append(now)
        self.num_restarts += 1
        self._restart_at = now + delay_s
        return delay_s

    def restart_due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._restart_at is not None and now >= self._restart_at

    def close(self) -> None:
        if self._notify is not None:
            path = self._notify.getsockname()
            self._notify.close()
            self._notify = None
            try:
                os.unlink(path)
            except OSError:
                pass


class Children:
    """The supervisor's children by name, in start order."""

    def __init__(self, run_dir: str, env: dict[str, str]):
        self.run_dir, self.env = run_dir, env
        self._by_name: dict[str, Child] = {}

    def add(self, name: str, argv: list[str]) -> Child:
        child = self._by_name[name] = Child(name, argv, self.env, os.path.join(self.run_dir, f"{name}.notify"))
        return child

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._by_name.values()))

    def __getitem__(self, name: str) -> Child:
        return self._by_name[name]

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self if c.proc is not None}

    def read_notifications(self) -> None:
        for child in self:
            child.read_notifications()

    def close(self) -> None:
        for child in self:
            child.close()
