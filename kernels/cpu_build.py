"""Builds a kernels/csrc/ extension so that no start-up can ever wedge on a build.

Used by kernels/cpu_kernels.py (`build`, `import_extension`), and run as the compile child:
`python -m kernels.cpu_build --name N --source S --out DIR ...`.

Invariants (the cache directory holds `<name>.so`, `<name>.lock` and `<name>.build-*/`):
- The only lock between processes is an fcntl.flock on `<name>.lock`. The kernel drops it when
  its holder exits, however it exits (SIGKILL included), so a dead builder never blocks anyone.
  The lock file is never deleted: deleting it would let two processes lock two different inodes.
- Only the lock holder builds, in a fresh private directory `<name>.build-XXXX`, so torch's own
  lock (its FileBaton `lock` file, which outlives a killed builder) is never seen by anyone else.
  Hence a build directory of this name that is not ours, seen while we hold the lock, belongs to
  a dead builder and is removed; other names' build directories only past STALE_BUILD_S.
- The compile runs in a child process in its own process group; the group is killed on timeout
  or cancel, and the child kills its group itself when its parent dies (`_watch_parent`).
- `<name>.so` is complete whenever it exists: it is moved there by os.replace (atomic on one
  file system) from the build directory, which lies in the same cache directory.
- Every wait is bounded: the lock by `lock_wait_s`, the compile by `timeout_s` (seconds), and
  `cancelled()` is polled every POLL_S seconds during both.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

POLL_S = 0.1  # how often waits poll the lock, the child and `cancelled()`, seconds
STALE_BUILD_S = 3600.0  # another name's build directory older than this is debris, seconds
LOG_NAME = "build.log"  # the child's stdout and stderr, inside its build directory
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds the `kernels` package

Emit = Callable[[str, dict], None]


class BuildError(Exception):
    """No kernel, and why, in one line (kernels/cpu_kernels.py's `error()`)."""


def so_path(cache: str, name: str) -> str:
    return os.path.join(cache, f"{name}.so")


def build(name: str, source: str, cflags: list[str], ldflags: list[str], cache: str, timeout_s: float,
          lock_wait_s: float, cancelled: Callable[[], bool], emit: Emit) -> tuple[str, str]:
    """("built" or "cached", the .so's path); BuildError when there is none. Waits at most
    `lock_wait_s` for another process's build, then compiles for at most `timeout_s` (seconds)."""
    os.makedirs(cache, exist_ok=True)
    path = so_path(cache, name)
    if os.path.exists(path):
        return "cached", path
    with _locked(os.path.join(cache, f"{name}.lock"), lock_wait_s, cancelled, emit):
        if os.path.exists(path):  # built by the process we waited for
            return "cached", path
        _remove_debris(cache, name)
        out = tempfile.mkdtemp(prefix=f"{name}.build-", dir=cache)
        try:
            emit("started", {"name": name, "path": path, "build_dir": out, "timeout_s": timeout_s})
            _run_child(compile_command(name, source, out, cflags, ldflags), out, timeout_s, cancelled)
            built = os.path.join(out, f"{name}.so")
            if not os.path.isfile(built):
                raise BuildError(f"the compile exited 0 but left no {name}.so")
            os.replace(built, path)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return "built", path


def import_extension(name: str, path: str):
    """Load a built extension module from `path` (no build, whichever interpreter built it)."""
    import torch  # noqa: F401  (the extension links against libtorch: torch loads those libraries)

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_command(name: str, source: str, out: str, cflags: list[str], ldflags: list[str]) -> list[str]:
    """The compile child's argv (tests replace this to fake a compile)."""
    return [sys.executable, "-m", "kernels.cpu_build", "--name", name, "--source", source, "--out", out,
            "--cflags", json.dumps(cflags), "--ldflags", json.dumps(ldflags), "--parent-pid", str(os.getpid())]


@contextmanager
def _locked(lock_path: str, wait_s: float, cancelled: Callable[[], bool], emit: Emit) -> Iterator[None]:
    """Hold the flock on `lock_path`; BuildError past `wait_s` seconds or once `cancelled()`.
    The holder writes its pid into the file, for the "waiting" event (advisory only)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            holder = _holder(fd)
            if not waiting:
                waiting = True
                emit("waiting", {"lock": lock_path, "holder_pid": holder, "lock_wait_s": wait_s})
            if cancelled():
                raise BuildError(f"cancelled while waiting for another process's build (lock {lock_path})")
            if time.monotonic() >= deadline:
                raise BuildError(f"timeout: waited {wait_s:g} s for another process's build "
                                 f"(pid {holder}, lock {lock_path})")
            time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _remove_debris(cache: str, name: str) -> None:
    """Under `name`'s lock: every other `name` build directory is a dead builder's (see the module
    docstring); other names' ones only once older than STALE_BUILD_S. Never fails a build."""
    now = time.time()
    for entry in os.listdir(cache):
        if ".build-" not in entry:
            continue
        full = os.path.join(cache, entry)
        try:
            if entry.startswith(f"{name}.build-") or now - os.stat(full).st_mtime > STALE_BUILD_S:
                shutil.rmtree(full, ignore_errors=True)
        except OSError:
            pass


def _run_child(argv: list[str], out: str, timeout_s: float, cancelled: Callable[[], bool]) -> None:
    """Run the compile child in its own process group; kill the group past `timeout_s` seconds,
    once `cancelled()`, or if this wait itself is interrupted."""
    env = dict(os.environ)
    # ninja may come from the virtualenv (the `ninja` package) rather than the system.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = os.path.join(out, LOG_NAME)
    with open(log_path, "wb") as log:  # a file, not a pipe: a chatty compiler can never block on it
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=out, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        while True:
            try:
                proc.wait(POLL_S)
                finished = True
                break
            except subprocess.TimeoutExpired:
                pass
            if cancelled():
                raise BuildError("cancelled during the compile (the compiler was killed)")
            if time.monotonic() >= deadline:
                raise BuildError(f"timeout: the compile ran past {timeout_s:g} s (the compiler was killed)")
    finally:
        if not finished:
            _kill_group(proc.pid)
            proc.wait()
    if proc.returncode != 0:
        raise BuildError(f"the compile failed (exit {proc.returncode}): {_last_line(log_path)}")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    return lines[-1][:400] if lines else "no output"


# ---- the compile child -------------------------------------------------------------------------

def _watch_parent(parent_pid: int) -> None:
    """The builder died (SIGKILL too): kill our whole group (ninja, g++ and us) so no orphan
    compile competes with the next builder for the CPUs. Its build directory is debris then."""
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.cpu_build")
    parser.add_argument("--name", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cflags", default="[]", help="a JSON list")
    parser.add_argument("--ldflags", default="[]", help="a JSON list")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    try:
        from torch.utils.cpp_extension import load

        # Builds <out>/<name>.so, then imports it: a module that cannot load fails here.
        load(args.name, [args.source], extra_cflags=json.loads(args.cflags), extra_ldflags=json.loads(args.ldflags),
             build_directory=args.out, verbose=False)
    except Exception as e:  # the parent reports our last line
        text = str(e).strip()
        print(f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
