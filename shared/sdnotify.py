"""systemd's notify protocol in pure Python (no libsystemd): READY, STATUS, WATCHDOG, STOPPING.

A message is one datagram of newline-separated `KEY=value` lines sent to the
AF_UNIX socket named by $NOTIFY_SOCKET; a leading '@' names the abstract
namespace. Without $NOTIFY_SOCKET every call is a no-op, so roles call it
unconditionally.

The watchdog: with `WatchdogSec=` systemd sets $WATCHDOG_USEC (and
$WATCHDOG_PID, which must be ours). Each role calls `tick()` from its own event
loop, never from a thread, so a hung loop stops the pings and systemd kills it.
`tick()` pings at half the interval, as sd_watchdog_enabled(3) advises.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends notify messages; silent when not started by systemd (or a test posing as it)."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self._addr = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self.watchdog_interval_s = _watchdog_interval_s(env)
        self._next_ping = 0.0  # monotonic seconds

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self.watchdog_interval_s is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False when disabled or the socket is gone (never raises:
        a missing supervisor must not take a role down)."""
        if self._addr is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop on a full queue: drop the message instead.
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), socket.MSG_DONTWAIT, self._addr)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "") -> None:
        self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def tick(self, now: float | None = None) -> None:
        """Call from the event loop at least every `watchdog_interval_s / 2`; pings when due."""
        if not self.watchdog_enabled:
            return
        now = time.monotonic() if now is None else now
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval_s / 2
            self.notify("WATCHDOG=1")

    @property
    def tick_period_s(self) -> float | None:
        """How often the loop should wake up to `tick()` (None: no watchdog)."""
        return self.watchdog_interval_s / 2 if self.watchdog_enabled else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and other kinds are not ours to handle


def _watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """$WATCHDOG_USEC in seconds, or None when unset, invalid, or meant for another pid."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


def _one_line(text: str) -> str:
    return text.replace("\n", " ")


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: without the notify variables, so only the
    process systemd started speaks to systemd."""
    env = dict(os.environ if environ is None else environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    return env
