"""shared/sdnotify.py against a datagram socket posing as systemd."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from shared.sdnotify import Notifier, child_environment


@pytest.fixture
def fake_systemd(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_ready_status_stopping_arrive_as_datagrams(fake_systemd):
    path, sock = fake_systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled and not n.watchdog_enabled
    n.ready("serving")
    n.status("line one\nline two")
    n.stopping()
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert sock.recv(4096) == b"STATUS=line one line two"
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_socket():
    name = f"pagedserve-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_watchdog_pings_at_half_the_interval(fake_systemd):
    path, sock = fake_systemd
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval_s == 2.0 and n.tick_period_s == 1.0
    n.tick(now=100.0)
    n.tick(now=100.5)  # not due yet
    n.tick(now=101.0)
    sock.settimeout(0.2)
    got = []
    try:
        while True:
            got.append(sock.recv(4096))
    except TimeoutError:
        pass
    assert got == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_watchdog_meant_for_another_pid_or_invalid_is_off(fake_systemd):
    path, _ = fake_systemd
    assert not Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_enabled
    assert not Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "soon"}).watchdog_enabled
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}).watchdog_enabled


def test_without_notify_socket_everything_is_a_quiet_no_op(tmp_path):
    n = Notifier({})
    assert not n.enabled and not n.notify("READY=1")
    n.tick()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert gone.notify("READY=1") is False  # a vanished systemd must not crash a role


def test_children_do_not_inherit_the_notify_variables():
    env = child_environment({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}
