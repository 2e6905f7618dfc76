"""`pagedserve build-kernels`: build (or find) the CPU decode kernel ahead of serving.

systemd runs it as the worker's ExecStartPre, so the first start on a machine compiles once,
visibly, before any worker loads weights; workers then find it cached. Safe to run at any time,
concurrently with workers or itself: kernels/cpu_build.py locks with flock and publishes the .so
atomically, and a run killed at any instant leaves nothing that blocks the next one.

Progress and the outcome go to stderr, one human line each; with --json the outcome is also one
JSON object on stdout. Exit 0 when the kernel is built or cached, and also when it cannot be
built (no compiler: workers then decode on the slower torch path), unless --strict: then 1.
A SIGTERM or SIGINT stops the build (the compiler is killed): exit 1.

Imports torch only inside `run`, so `pagedserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

DEFAULT_TIMEOUT_S = 900.0  # the compile takes about a minute on 2 cores; generous for slow machines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds the compile may take before it is killed (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--lock-wait-s", type=float, default=None,
                        help="seconds to wait for another process's build of the same kernel "
                             "(default: --timeout-s)")
    parser.add_argument("--json", action="store_true", help="also print the outcome as one JSON object on stdout")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when the kernel cannot be built (default: exit 0, workers use the torch path)")


def run(args) -> int:
    timeout_s = args.timeout_s
    lock_wait_s = timeout_s if args.lock_wait_s is None else args.lock_wait_s
    signals, restore = _count_signals()
    try:
        return _build(args, timeout_s, lock_wait_s, signals)
    finally:
        restore()


def _build(args, timeout_s: float, lock_wait_s: float, signals: list[int]) -> int:
    """Build or find the kernel; the exit code (see the module docstring)."""

    def say(line: str) -> None:
        print(f"pagedserve build-kernels: {line}", file=sys.stderr, flush=True)

    def on_event(kind: str, fields: dict) -> None:
        if kind == "waiting":
            holder = fields.get("holder_pid")
            say(f"another process{f' (pid {holder})' if holder else ''} is building the CPU decode kernel; "
                f"waiting up to {lock_wait_s:g} s")
        elif kind == "started":
            say(f"building the CPU decode kernel (about a minute; at most {timeout_s:g} s) into {fields['path']}")

    from kernels import cpu_kernels  # imports torch

    cpu_kernels.load(timeout_s=timeout_s, lock_wait_s=lock_wait_s, cancelled=lambda: signals[0] > 0,
                     on_event=on_event)
    result = cpu_kernels.last_load()
    ok = result is not None and result.action != "failed"
    if ok:
        verb = "built" if result.action == "built" else "found (cached)"
        say(f"CPU decode kernel {verb} in {result.seconds:.1f} s: {result.path}")
    elif signals[0]:
        say(f"stopped by a signal: {cpu_kernels.error()}")
    else:
        say(f"the CPU decode kernel cannot be built: {cpu_kernels.error()}. Workers will decode on the "
            "slower torch path (same tokens)" + ("" if not args.strict else "; --strict: exit 1"))
    if args.json:
        print(json.dumps({"action": result.action if result else "failed", "ok": ok,
                          "seconds": result.seconds if result else 0.0, "path": result.path if result else None,
                          "cache_dir": cpu_kernels.cache_dir(), "error": cpu_kernels.error()}), flush=True)
    if ok:
        return 0
    return 1 if args.strict or signals[0] else 0


def _count_signals():
    """SIGTERM/SIGINT counted in a one-element list (polled by the build, which then kills the
    compiler and cleans up) rather than killing us mid-build; and a function that puts the
    previous handlers back. Only the main thread can install handlers: elsewhere, none."""
    count = [0]
    if threading.current_thread() is not threading.main_thread():
        return count, lambda: None

    def handler(_signum, _frame) -> None:
        count[0] += 1

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return count, restore
