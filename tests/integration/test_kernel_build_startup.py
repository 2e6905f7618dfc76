"""A server whose start-up is killed during the CPU kernel build starts cleanly the next time.

Each case starts `serve` on an empty kernel cache (PAGEDSERVE_CACHE_DIR in tmp), so the worker
compiles kernels/csrc/ (worker.kernel_build_started), and interrupts it mid-compile: SIGKILL of
the worker (a worker dead before it was ever ready stops the whole server, exit 1, by design),
or SIGTERM of the supervisor. The next start on the same cache must become ready within the
normal start-up time, with the kernel, and answer greedily as transformers does.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from server_process import ServerProcess

from shared.client import Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of Japan is", "def fibonacci(n):", "The quick brown fox"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def _start_building(tmp_path, cache: str) -> ServerProcess:
    srv = ServerProcess(str(tmp_path / "run1"), env={"PAGEDSERVE_CACHE_DIR": cache}, wait_ready=False)
    try:
        srv.wait_for("worker.kernel_build_started", timeout_s=240)
    except AssertionError:
        srv.stop()
        raise
    time.sleep(2)  # into the compile itself: ninja and g++ running
    return srv


def _no_process_uses(cache: str, timeout_s: float = 10.0) -> None:
    """Nothing (a compile left behind by the dead builder) still runs in the cache directory."""
    deadline = time.monotonic() + timeout_s
    while True:
        users = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if cache.encode() in cmdline and not zombie:
                users.append(cmdline.replace(b"\0", b" ")[:200])
        if not users:
            return
        assert time.monotonic() < deadline, users
        time.sleep(0.2)


def _restart_and_check(tmp_path, cache: str, greedy) -> None:
    """Start again on the same cache: ready, the kernel in use, transformers' tokens."""
    srv = ServerProcess(str(tmp_path / "run2"), env={"PAGEDSERVE_CACHE_DIR": cache}, wait_ready=False)
    try:
        deadline = time.monotonic() + 300  # ServerProcess's normal start-up time
        while not srv.named("server.ready"):
            if srv.procs[0].poll() is not None or time.monotonic() > deadline:
                problems = [e for e in srv.events if e.get("level") in ("warning", "error")]
                raise AssertionError(f"not ready (exit {srv.procs[0].poll()}); warnings and errors: {problems}")
            time.sleep(0.2)
        with Client(srv.address) as c:
            outs = [c.generate(p, GREEDY) for p in PROMPTS]
        finished = srv.wait_for("worker.kernel_build_finished")
        loaded = srv.wait_for("worker.loaded")
    finally:
        assert srv.stop() == 0
    assert finished["action"] == "built"  # the interrupted build published nothing
    assert loaded["cpu_decode_kernel"] == "built"
    assert not srv.named("worker.kernel_build_failed") and not srv.named("worker.kernel_build_waiting")
    for out in outs:
        assert out.token_ids == greedy(out.prompt_token_ids, 16), out.prompt_token_ids


def test_worker_killed_mid_build_then_a_clean_start(tmp_path, hf_reference):
    _, greedy = hf_reference
    cache = str(tmp_path / "cache")
    srv = _start_building(tmp_path, cache)
    try:
        os.kill(srv.child_pid("worker0"), signal.SIGKILL)
        assert srv.procs[0].wait(120) == 1  # never ready in its first run: the server stops
    finally:
        srv.stop()
    exited = srv.wait_for("supervisor.child_exited", child="worker0")
    assert exited["exit_code"] == -signal.SIGKILL and exited["ready"] is False
    _no_process_uses(cache)
    _restart_and_check(tmp_path, cache, greedy)


def test_supervisor_stopped_mid_build_then_a_clean_start(tmp_path, hf_reference):
    _, greedy = hf_reference
    cache = str(tmp_path / "cache")
    srv = _start_building(tmp_path, cache)
    started = time.monotonic()
    try:
        srv.procs[0].send_signal(signal.SIGTERM)
        srv.procs[0].wait(120)
    finally:
        srv.stop()
    assert time.monotonic() - started < 60, "the worker should stop its build at the SIGTERM, not finish it"
    failed = srv.named("worker.kernel_build_failed")
    assert failed and "cancelled" in failed[0]["reason"] and failed[0]["fallback"] == "torch"
    assert not srv.named("worker.kernel_build_finished") and not srv.named("worker.loaded")
    _no_process_uses(cache)
    _restart_and_check(tmp_path, cache, greedy)
