"""A peer's HTTP server for one benchmark phase: started on loopback, ready when its
`GET /v1/models` answers 200 (bounded), stopped with its whole process group.

Its output goes to a log file beside the results; a server that exits or is not ready in time
raises PeerUnavailable naming the log and quoting its last lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

from bench.peer_setup import LOG_TAIL_CHARS, PeerUnavailable

READY_POLL_S = 0.5
STOP_TIMEOUT_S = 30.0


class PeerServer:
    """`argv` started in a session of its own; `base_url` is http://127.0.0.1:PORT."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: str, ready_timeout_s: float,
                 env: dict[str, str] | None = None):
        self.name, self.log_path = name, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "w")
        try:
            self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
        except OSError as exc:
            self._log.close()
            raise PeerUnavailable(f"{name}: could not start {argv[0]}: {exc}") from None
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready():
            if self.proc.poll() is not None:
                self.stop()
                raise PeerUnavailable(f"{name} exited with code {self.proc.returncode} before it was ready "
                                      f"(log: {log_path}):\n{self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PeerUnavailable(f"{name} was not ready within {ready_timeout_s:.0f} s (log: {log_path}):\n"
                                      f"{self._tail()}")
            time.sleep(READY_POLL_S)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/v1/models", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _tail(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-LOG_TAIL_CHARS:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # children that outlived the leader (vLLM's engine core) go with it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> "PeerServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
