"""The one drain helper: first signal begins, a second signal or the deadline aborts, once."""

from __future__ import annotations

import os
import signal

from shared.drain import Drain


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_signal_begins_then_the_deadline_aborts_once():
    clock = Clock()
    drain = Drain(5.0, clock=clock)
    assert drain.poll() is None and not drain.draining
    drain.handle_signal()
    assert drain.poll() == "begin" and drain.draining and drain.seconds_left() == 5.0
    clock.now += 4.9
    assert drain.poll() is None
    clock.now += 0.2
    assert drain.poll() == "abort" and drain.abort_cause == "drain_timeout"
    assert drain.poll() is None  # once


def test_no_timeout_abort_without_work_left():
    clock = Clock()
    drain = Drain(1.0, clock=clock)
    drain.handle_signal()
    assert drain.poll(work_left=False) == "begin"
    clock.now += 10
    assert drain.poll(work_left=False) is None and not drain.aborted


def test_second_signal_aborts_even_before_the_first_was_seen():
    drain = Drain(30.0, clock=Clock())
    drain.handle_signal()
    assert drain.poll() == "begin"
    drain.handle_signal()
    assert drain.poll() == "abort" and drain.abort_cause == "second_signal"
    both = Drain(30.0, clock=Clock())
    both.handle_signal()
    both.handle_signal()
    assert both.poll() == "abort" and both.draining  # begin and abort at once


def test_installed_handler_counts_a_real_sigterm():
    woken = []
    drain = Drain(1.0, on_signal=lambda: woken.append(True))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        drain.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert drain.signals == 1 and woken == [True] and drain.poll() == "begin"
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
