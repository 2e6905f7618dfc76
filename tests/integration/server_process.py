"""Start pagedserve on loopback with a free port and a private run dir; stop it.

`ServerProcess` runs `pagedserve serve` (one supervisor, three children) or, with
`separate_roles=True`, the scheduler, worker and frontend as three independent
processes sharing the flags, as systemd units would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server; `events` collects every JSON event it logged on stdout."""

    def __init__(self, run_dir: str, *extra: str, separate_roles: bool = False, ready_timeout_s: float = 300.0,
                 role_env: dict[str, dict[str, str]] | None = None, env: dict[str, str] | None = None,
                 wait_ready: bool = True):
        """`role_env`: extra environment variables per role name (e.g. a NOTIFY_SOCKET each); `env`:
        extra ones for every role. `wait_ready=False`: return once started, without waiting for
        `server.ready` (then `wait_for` it, or for whatever the test expects instead)."""
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.run_dir = run_dir
        flags = ["--model", "default", "--device", "cpu", "--dtype", "float32", "--listen", self.address,
                 "--run-dir", run_dir, "--stats-interval-s", "2", *extra]
        roles = ["scheduler", "worker", "frontend"] if separate_roles else ["serve"]
        self.events: list[dict] = []
        self.non_json_lines: list[str] = []
        self._ready = threading.Event()
        self.roles = roles
        self.procs = [subprocess.Popen([sys.executable, "-m", "launcher", role, *flags], stdout=subprocess.PIPE,
                                       env={**os.environ, **(env or {}), **(role_env or {}).get(role, {})},
                                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                                       start_new_session=True) for role in roles]
        self._readers = [threading.Thread(target=self._read, args=(p,), daemon=True) for p in self.procs]
        for r in self._readers:
            r.start()
        deadline = time.monotonic() + ready_timeout_s
        while wait_ready and not self._ready.wait(0.5):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not become ready; last events: {self.events[-5:]}")

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self.non_json_lines.append(line)
                continue
            self.events.append(event)
            if event.get("event") == "server.ready":
                self._ready.set()

    def named(self, name: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("event") == name]

    def child_pid(self, child: str) -> int | None:
        """Under serve: the pid of the supervisor's child `child` (e.g. "worker0") now running,
        from `supervisor.started` and `supervisor.child_restarted`."""
        pid = None
        for e in list(self.events):
            if e.get("event") == "supervisor.started":
                pid = e["children"].get(child)
            elif e.get("event") == "supervisor.child_restarted" and e.get("child") == child:
                pid = e["pid"]
        return pid

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 120.0, **fields) -> dict:
        """The `count`-th event `name` whose fields include `fields`; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in self.named(name) if all(e.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {name} {fields} within {timeout_s} s; last events: {self.events[-5:]}")

    def stop(self) -> int:
        """SIGTERM every process; the first one's exit code (the supervisor's, under serve)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for r in self._readers:
            r.join(5)
        return self.procs[0].returncode
