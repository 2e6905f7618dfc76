"""Operations: systemd units, sd_notify from each role, graceful drain, the event catalogue.

Two servers in all (model loads are the slow part): one `serve` drained in the
middle of 8 streams, and the three roles started on their own, as systemd units
would be, each with a fake NOTIFY_SOCKET, stopped together with a short drain
timeout.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from server_process import ServerProcess

from shared.client import AsyncClient, RequestError
from shared.protocol import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS_DIR = os.path.join(ROOT, "systemd")
SERVICES = ["pagedserve-scheduler.service", "pagedserve-frontend.service", "pagedserve-worker@.service",
            "pagedserve-replica@.service", "pagedserve-replica-worker@.service"]
COMMON_FIELDS = {"event", "level", "ts", "role", "pid"}
MAX_EXPOSURE = 6.0

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed (.ci/run installs it)")


# -- the event catalogue -------------------------------------------------------------------

def documented_events() -> dict[str, tuple[set[str], set[str]]]:
    """docs/events.md tables: event name -> (required fields, optional fields)."""
    events = {}
    with open(os.path.join(ROOT, "docs", "events.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("| `") or len(cells) < 3:
                continue
            fields = re.findall(r"`([^`]+)`", cells[2])
            required = {name for name in fields if not name.endswith("?")}
            optional = {name[:-1] for name in fields if name.endswith("?")}
            for name in re.findall(r"`([^`]+)`", cells[0]):
                events[name] = (required, optional)
    return events


def logged_event_names() -> set[str]:
    """Event names passed literally to a structlog call anywhere in the code."""
    call = re.compile(r"\b_?log\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+\.[a-z_.]+)\"")
    names = set()
    for package in ("launcher", "shared", "frontend", "scheduler", "worker", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name)) as f:
                        names |= set(call.findall(f.read()))
    return names


def check_events_against_docs(events: list[dict]) -> None:
    catalogue = documented_events()
    for e in events:
        name = e.get("event")
        assert name in catalogue, f"event {name!r} is not in docs/events.md"
        missing = (catalogue[name][0] | COMMON_FIELDS) - e.keys()
        assert not missing, f"{name} lacks documented fields {sorted(missing)}: {e}"


def test_every_logged_event_is_documented_and_every_documented_one_is_logged():
    documented, logged = set(documented_events()), logged_event_names()
    assert logged - documented == set(), "logged but not in docs/events.md"
    # `<role>.fatal` is logged with a computed name (launcher/cli.py).
    assert {n for n in documented - logged if not n.endswith(".fatal")} == set(), "documented but never logged"


# -- systemd units ---------------------------------------------------------------------------

@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    for name in os.listdir(UNITS_DIR):
        shutil.copy(os.path.join(UNITS_DIR, name), tmp_path)
    units = [str(tmp_path / n) for n in
             ("pagedserve-scheduler.service", "pagedserve-frontend.service", "pagedserve-worker@.service",
              "pagedserve-worker@0.service", "pagedserve.target", "pagedserve-replica@.service",
              "pagedserve-replica@0.service", "pagedserve-replica-worker@0.service", "pagedserve-replicas.target")]
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pagedserve" not in proc.stderr, proc.stderr  # no warning about our units either


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_service_exposure_is_at_most_six(unit):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", os.path.join(UNITS_DIR, unit)],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("systemd-sysusers") or not shutil.which("systemd-tmpfiles"),
                    reason="needs root and systemd-sysusers/systemd-tmpfiles")
def test_sysusers_and_tmpfiles_make_the_shared_socket_directory(tmp_path):
    (tmp_path / "etc").mkdir()
    for tool, conf in (("systemd-sysusers", "pagedserve.sysusers.conf"),
                       ("systemd-tmpfiles", "pagedserve.tmpfiles.conf")):
        args = [tool, f"--root={tmp_path}", os.path.join(UNITS_DIR, conf)]
        if tool == "systemd-tmpfiles":
            args.insert(1, "--create")
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    group = next(line.split(":") for line in (tmp_path / "etc" / "group").read_text().splitlines()
                 if line.startswith("pagedserve:"))
    run_dir = os.stat(tmp_path / "run" / "pagedserve")
    assert stat.S_IMODE(run_dir.st_mode) == 0o750 and run_dir.st_gid == int(group[2])


# -- a live server ---------------------------------------------------------------------------

def _wait_for(predicate, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "The capital of Japan is",
           "In 1969, humans first", "The quick brown fox", "A recipe for pancakes begins with",
           "Photosynthesis is the process by which"]


@pytest.mark.slow
def test_sigterm_to_serve_drains_eight_streams_and_refuses_new_ones(tmp_path):
    # A drain timeout far above what 24 tokens need: this test is about finishing, not about time.
    srv = ServerProcess(str(tmp_path / "run"), "--drain-timeout", "300")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    try:
        table = subprocess.run([sys.executable, "-m", "launcher", "stats", "--server", srv.address], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)

        async def scenario():
            async with AsyncClient(srv.address) as client:
                streaming: set[str] = set()

                async def one(prompt):
                    stream = client.stream(prompt, params)
                    async for _ in stream:
                        streaming.add(prompt)
                    return stream.completion

                tasks = [asyncio.create_task(one(pr)) for pr in PROMPTS]
                while len(streaming) < len(PROMPTS):
                    await asyncio.sleep(0.01)
                srv.procs[0].send_signal(signal.SIGTERM)
                while not srv.named("frontend.draining"):
                    await asyncio.sleep(0.02)
                with pytest.raises(RequestError) as refused:
                    await client.generate("Too late", SamplingParams(max_tokens=4), timeout=60)
                return await asyncio.gather(*tasks), refused.value.code

        completions, refused_code = asyncio.run(scenario())
        exit_code = srv.procs[0].wait(400)
    finally:
        srv.stop()

    assert refused_code == "shutting_down"
    assert [c.finish_reason for c in completions] == ["length"] * 8
    assert all(len(c.token_ids) == 24 for c in completions)
    assert exit_code == 0
    assert srv.named("frontend.draining")[0]["requests_in_flight"] == 8
    assert srv.named("supervisor.stopped")[0]["children_exit_codes"] == {"scheduler": 0, "worker0": 0, "frontend": 0}
    # The frontend finished draining before the scheduler was told to stop, and the scheduler
    # then stopped the worker.
    order = [e["event"] for e in srv.events if e["event"] in ("frontend.stopped", "scheduler.draining")]
    assert order == ["frontend.stopped", "scheduler.draining"]
    assert [e["reason"] for e in srv.named("worker.stopped")] == ["scheduler: the scheduler is stopping"]

    assert table.returncode == 0, table.stderr
    rows = dict(line.split(None, 1) for line in table.stdout.splitlines())
    assert rows["status"] == "ok" and rows["kv_blocks"].endswith("%)") and "running" in rows

    # Every stdout line of the run is a JSON event carrying the fields docs/events.md promises.
    assert not srv.non_json_lines
    seen = {e["event"] for e in srv.events}
    assert {"scheduler.stats", "worker.ready", "request.finished", "request.error", "supervisor.stopped"} <= seen
    check_events_against_docs(srv.events)


class FakeSystemd:
    """One datagram socket per role, posing as $NOTIFY_SOCKET; a thread keeps reading it."""

    def __init__(self, directory, roles):
        self.messages: dict[str, list[str]] = {role: [] for role in roles}
        self.env, self._socks = {}, []
        for role in roles:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            path = os.path.join(directory, f"{role}.notify")
            sock.bind(path)
            sock.settimeout(0.2)
            self._socks.append(sock)
            self.env[role] = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
            threading.Thread(target=self._read, args=(sock, self.messages[role]), daemon=True).start()

    @staticmethod
    def _read(sock, out: list[str]) -> None:
        while True:
            try:
                out.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        for sock in self._socks:
            sock.close()


def _kinds(messages: list[str]) -> list[str]:
    """The notify keys in order, STATUS= lines left out: e.g. READY, WATCHDOG, WATCHDOG, STOPPING."""
    return [line.split("=")[0] for m in messages for line in m.splitlines() if not line.startswith("STATUS=")]


@pytest.mark.slow
def test_roles_notify_systemd_and_a_drain_timeout_aborts(tmp_path):
    roles = ["scheduler", "worker", "frontend"]
    fake = FakeSystemd(str(tmp_path), roles)
    srv = ServerProcess(str(tmp_path / "run"), "--drain-timeout", "2", separate_roles=True, role_env=fake.env)
    try:
        for role in roles:
            _wait_for(lambda: "WATCHDOG" in _kinds(fake.messages[role]), 30, f"{role}'s first watchdog ping")

        async def long_request():
            async with AsyncClient(srv.address) as client:
                stream = client.stream("Once upon a time", SamplingParams(max_tokens=4000, temperature=0.0,
                                                                          ignore_eos=True))
                got = 0
                async for _ in stream:
                    got += 1
                    if got == 2:  # systemd stops the units in parallel
                        for proc in srv.procs:
                            proc.send_signal(signal.SIGTERM)
                return stream.completion

        completion = asyncio.run(long_request())
        exit_codes = [proc.wait(60) for proc in srv.procs]
        time.sleep(0.5)  # the readers pick up the last datagrams
    finally:
        srv.stop()
        fake.close()

    assert completion.finish_reason == "abort" and len(completion.token_ids) < 4000
    assert exit_codes == [0, 0, 0]
    for role in roles:
        kinds = _kinds(fake.messages[role])
        assert kinds[0] == "READY", (role, kinds)
        assert kinds.count("READY") == 1 and kinds.count("STOPPING") == 1, (role, kinds)
        stopping = kinds.index("STOPPING")
        assert "WATCHDOG" in kinds[1:stopping], (role, kinds)
        assert set(kinds[1:]) <= {"WATCHDOG", "STOPPING"}, (role, kinds)
    assert srv.named("frontend.drain_aborted") or srv.named("scheduler.drain_aborted")
    assert {e["reason"] for e in srv.named("worker.stopped")} == {"scheduler: the scheduler is stopping"}
    assert not srv.non_json_lines
    check_events_against_docs(srv.events)
