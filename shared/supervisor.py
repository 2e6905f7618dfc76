"""`pagedserve serve`: every role as a child process of one supervisor.

For a laptop, CI and demos. Under systemd each role is its own unit instead.
Children inherit stdout, so all JSON events arrive on one stream. A child that
dies takes the whole server down with a non-zero exit (recovering a role in
place belongs to the fault-tolerance work); SIGTERM/SIGINT stop every child.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from shared.config import ServerConfig
from shared.logging import get_logger

log = get_logger()

STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _strip_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def run_supervisor(config: ServerConfig, argv: list[str]) -> int:
    own_run_dir = not config.run_dir
    run_dir = tempfile.mkdtemp(prefix="pagedserve-") if own_run_dir else config.run_dir
    os.makedirs(run_dir, mode=0o750, exist_ok=True)
    base = _strip_flag(_strip_flag(argv, "--run-dir"), "--rank") + ["--run-dir", run_dir]
    cmd = [sys.executable, "-m", "shared.cli"]
    specs = [("scheduler", cmd + ["scheduler"] + base)]
    specs += [(f"worker{r}", cmd + ["worker"] + base + ["--rank", str(r)])
              for r in range(config.tensor_parallel_size)]
    specs += [("frontend", cmd + ["frontend"] + base)]

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    children = {name: subprocess.Popen(argv_, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)
                for name, argv_ in specs}
    log.info("supervisor.started", run_dir=run_dir, listen=config.listen,
             children={name: c.pid for name, c in children.items()})
    code = 0
    while not stopping:
        dead = [(name, c.returncode) for name, c in children.items() if c.poll() is not None]
        if dead:
            for name, rc in dead:
                log.error("supervisor.child_exited", child=name, exit_code=rc)
            code = 1
            break
        time.sleep(0.2)
    _stop_all(children)
    if own_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("supervisor.stopped", exit_code=code)
    return code


def _stop_all(children: dict[str, subprocess.Popen]) -> None:
    for c in children.values():
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for c in children.values():
        try:
            c.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
