"""Start `pagedserve serve` for a benchmark on loopback (a free port, a private run dir), stop it.

Its JSON log goes to a file beside the results, so the bench's own output stays a
progress bar and a table.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    def __init__(self, flags: list[str], log_path: str, ready_timeout_s: float = 600.0):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self._run_dir = tempfile.TemporaryDirectory(prefix="pagedserve-bench-")
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "serve", "--listen", self.address, "--run-dir", self._run_dir.name,
             *flags], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not become ready: see {log_path}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        with open(self.log_path) as f:
            for line in f:
                try:
                    if json.loads(line).get("event") == "server.ready":
                        return True
                except json.JSONDecodeError:
                    continue
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self._run_dir.cleanup()

    def __enter__(self) -> "BenchServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
