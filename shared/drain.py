"""Stopping on SIGTERM, the same way in every role: drain first, then stop now.

The first SIGTERM (or SIGINT) begins a drain: the role refuses new work and lets
what is in flight finish, for at most `timeout_s` seconds. A second signal, or the
deadline, ends the drain: what is left is aborted (the scheduler and the frontend
finish it with "abort"; the worker and the supervisor stop waiting).

`Drain` only keeps the state and says what just happened; each role acts on it in
its own loop. The signal handler only counts (it may run between any two bytecodes,
so it touches nothing else); `poll()`, called from the role's loop, turns the count
into at most one transition per call. Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Literal

Transition = Literal["begin", "abort"]
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 on_signal: Callable[[], None] | None = None) -> None:
        """`on_signal`: called from the handler after counting (an asyncio role wakes its loop there)."""
        self.timeout_s = timeout_s
        self.signals = 0  # SIGTERM/SIGINT received
        self.deadline: float | None = None  # set when the drain begins
        self.abort_cause: str | None = None  # "second_signal" or "drain_timeout", once aborted
        self._clock = clock
        self._seen = 0
        self._on_signal = on_signal

    # -- signals ---------------------------------------------------------------------
    def handle_signal(self, *_args) -> None:
        """A signal handler: `signal.signal(SIGTERM, drain.handle_signal)` or an asyncio loop's."""
        self.signals += 1
        if self._on_signal is not None:
            self._on_signal()

    def install(self) -> None:
        """Handle SIGTERM and SIGINT in this (the main) thread."""
        for sig in _SIGNALS:
            signal.signal(sig, self.handle_signal)

    def install_on_loop(self, loop) -> None:
        """Handle SIGTERM and SIGINT on an asyncio event loop."""
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self.handle_signal)

    # -- state -----------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        """A drain began: refuse new work."""
        return self.deadline is not None

    @property
    def aborted(self) -> bool:
        """The drain ended early (second signal) or ran out of time."""
        return self.abort_cause is not None

    def seconds_left(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self._clock())

    def poll(self, work_left: bool = True) -> Transition | None:
        """Act on signals and the clock: "begin" when the first signal arrives, "abort" once,
        on a later signal or when the deadline passes with `work_left`; else None."""
        if self.signals != self._seen:
            first = self._seen == 0
            self._seen = self.signals
            if first:
                self.deadline = self._clock() + self.timeout_s
                if self.signals == 1:
                    return "begin"
                # Two signals before we looked: begin and abort at once (the caller sees "abort").
            if not self.aborted:
                self.abort_cause = "second_signal"
                return "abort"
        if (self.deadline is not None and not self.aborted and work_left
                and self._clock() >= self.deadline):
            self.abort_cause = "drain_timeout"
            return "abort"
        return None
