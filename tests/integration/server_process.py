"""Start `pagedserve serve` on loopback with a free port and a private run dir; stop it."""

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

    def __init__(self, run_dir: str, *extra: str, ready_timeout_s: float = 300.0):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.run_dir = run_dir
        argv = [sys.executable, "-m", "shared.cli", "serve", "--model", "default", "--device", "cpu",
                "--dtype", "float32", "--listen", self.address, "--run-dir", run_dir, "--stats-interval-s", "2",
                *extra]
        self.events: list[dict] = []
        self.non_json_lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not become ready; last events: {self.events[-5:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
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

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode
