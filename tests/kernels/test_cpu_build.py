"""kernels/cpu_build.py through kernels/cpu_kernels.py's `load()`: no start-up can wedge on a build.

Each test gets an empty cache (PAGEDSERVE_CACHE_DIR in tmp) and a fresh per-process state. Where the
real compile is not the point, a fake one stands in (`cpu_build.compile_command`): it hangs, fails, or
copies the kernel that the real compile built once per session (the `built` fixture; needs g++).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest

from kernels import cpu_build, cpu_kernels
from launcher import build_kernels_cmd
from worker import kernel_build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD_LOCK = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, "
             "fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid()); print('locked', flush=True); time.sleep(300)")
# A compile that never ends: it starts a grandchild (as ninja starts g++) and records both pids.
HANG = ("import os, subprocess, sys, time; g = subprocess.Popen(['sleep', '300'])\n"
        "with open(sys.argv[1], 'w') as f: f.write(f'{os.getpid()} {g.pid}')\ntime.sleep(300)")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The real build, once a session, in a subprocess (this process's state stays untouched):
    (cache base directory, LoadResult fields)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    base = str(tmp_path_factory.mktemp("kernel_cache"))
    code = ("import json; from dataclasses import asdict; from kernels import cpu_kernels as k\n"
            "k.load(); print(json.dumps(asdict(k.last_load())))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PAGEDSERVE_CACHE_DIR": base},
                          capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["action"] == "built", result
    return base, result


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache and no decision yet in this process; both restored afterwards."""
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    for attr in ("_module", "_error", "_last"):
        monkeypatch.setattr(cpu_kernels, attr, None)
    return cpu_kernels.cache_dir()


def _fake_compile(monkeypatch, script: str, *args: str) -> None:
    def command(name, source, out, cflags, ldflags):
        return [sys.executable, "-c", script, *args, os.path.join(out, f"{name}.so")]

    monkeypatch.setattr(cpu_build, "compile_command", command)


def _copy_compile(monkeypatch, built) -> None:
    """A compile that publishes the session's real build (the same name: the same source and flags)."""
    _fake_compile(monkeypatch, "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])", built[1]["path"])


def _hold_lock(cache_path: str) -> subprocess.Popen:
    os.makedirs(cache_path, exist_ok=True)
    lock = os.path.join(cache_path, f"{cpu_kernels._build_name()}.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _alive(pid: int) -> bool:
    """Running (not a zombie: PID 1 of a container may never reap the orphans we kill)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (process group, command line), of every process we may read."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f, open(f"/proc/{pid}/cmdline", "rb") as c:
                found[int(pid)] = (int(f.read().rsplit(")", 1)[1].split()[2]), c.read())
        except (OSError, IndexError):
            pass
    return found


def _leftovers(cache_path: str) -> list[str]:
    return sorted(e for e in os.listdir(cache_path) if ".build-" in e or e.endswith(".so"))


def _wait_dead(pids: list[int] | str, timeout_s: float = 5.0) -> None:
    """Every pid dead within `timeout_s` (pids: a list, or a file of them)."""
    if isinstance(pids, str):
        with open(pids) as f:
            pids = [int(p) for p in f.read().split()]
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]


def test_real_build_is_published_whole_and_found_cached(built, cache, monkeypatch):
    base, result = built
    assert os.path.isfile(result["path"]) and result["seconds"] > 0
    assert _leftovers(os.path.dirname(result["path"])) == [os.path.basename(result["path"])]  # no build dir
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", base)
    events = []
    module = cpu_kernels.load(on_event=lambda kind, fields: events.append(kind))
    assert module is not None, cpu_kernels.error()
    assert module.compiled_lanes()
    assert cpu_kernels.last_load().action == "cached" and cpu_kernels.last_load().path == result["path"]
    assert events == ["finished"]


def test_live_lock_holder_makes_load_wait_then_give_up_and_sigkill_frees_it(cache, monkeypatch, built):
    _copy_compile(monkeypatch, built)
    holder = _hold_lock(cache)
    try:
        events = []
        started = time.monotonic()
        assert cpu_kernels.load(lock_wait_s=1.5, on_event=lambda kind, fields: events.append((kind, fields))) is None
        assert 1.5 <= time.monotonic() - started < 4
        assert [k for k, _ in events] == ["waiting", "failed"]
        assert events[0][1]["holder_pid"] == holder.pid
        assert "waited 1.5 s" in cpu_kernels.error() and str(holder.pid) in cpu_kernels.error()
        assert cpu_kernels.last_load().action == "failed"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    monkeypatch.setattr(cpu_kernels, "_error", None)  # a new process would decide again
    events.clear()
    started = time.monotonic()
    assert cpu_kernels.load(lock_wait_s=30, on_event=lambda kind, fields: events.append((kind, fields))) is not None
    assert time.monotonic() - started < 10
    assert [k for k, _ in events] == ["started", "finished"]  # no wait: the dead holder's lock is gone
    assert cpu_kernels.last_load().action == "built"


def test_stale_torch_lock_and_dead_build_directories_block_nothing(cache, monkeypatch, built):
    _copy_compile(monkeypatch, built)
    name = cpu_kernels._build_name()
    os.makedirs(os.path.join(cache, name))
    open(os.path.join(cache, name, "lock"), "w").close()  # torch's FileBaton left by a killed build
    dead = os.path.join(cache, f"{name}.build-dead")  # a killed build: its baton and a half-written .so
    os.makedirs(dead)
    open(os.path.join(dead, "lock"), "w").close()
    with open(os.path.join(dead, f"{name}.so"), "wb") as f:
        f.write(b"\x7fELF half")
    with open(os.path.join(cache, f"{name}.lock"), "w") as f:
        f.write("999999\n")  # our lock file, with a dead pid in it but no flock on it
    old, fresh = os.path.join(cache, "other.build-old"), os.path.join(cache, "other.build-fresh")
    for d in (old, fresh):
        os.makedirs(d)
    os.utime(old, (time.time() - 7200,) * 2)  # two hours old
    events = []
    started = time.monotonic()
    assert cpu_kernels.load(lock_wait_s=30, on_event=lambda kind, fields: events.append(kind)) is not None
    assert time.monotonic() - started < 10
    assert events == ["started", "finished"]
    assert not os.path.exists(dead) and not os.path.exists(old)  # debris removed under the lock
    assert os.path.exists(fresh)  # another name's recent build directory: maybe live, left alone
    assert os.path.getsize(cpu_kernels.last_load().path) == os.path.getsize(built[1]["path"])


def test_compile_timeout_kills_the_child_group_and_publishes_nothing(cache, monkeypatch, tmp_path):
    pids_file = str(tmp_path / "pids")
    _fake_compile(monkeypatch, HANG, pids_file)
    started = time.monotonic()
    assert cpu_kernels.load(timeout_s=1.5) is None
    assert time.monotonic() - started < 5
    assert cpu_kernels.error().startswith("timeout:") and "1.5 s" in cpu_kernels.error()
    _wait_dead(pids_file)
    assert _leftovers(cache) == []


def test_cancel_stops_the_compile_quickly(cache, monkeypatch, tmp_path):
    pids_file = str(tmp_path / "pids")
    _fake_compile(monkeypatch, HANG, pids_file)
    started = time.monotonic()
    events = []
    assert cpu_kernels.load(timeout_s=120, cancelled=lambda: time.monotonic() > started + 1.0,
                            on_event=lambda kind, fields: events.append((kind, fields))) is None
    assert time.monotonic() - started < 4
    assert "cancelled" in cpu_kernels.error()
    assert [k for k, _ in events] == ["started", "failed"] and "cancelled" in events[1][1]["reason"]
    _wait_dead(pids_file)
    assert _leftovers(cache) == []


def test_cancel_stops_the_wait_quickly(cache):
    holder = _hold_lock(cache)
    try:
        started = time.monotonic()
        assert cpu_kernels.load(lock_wait_s=120, cancelled=lambda: time.monotonic() > started + 0.5) is None
        assert time.monotonic() - started < 3
        assert "cancelled while waiting" in cpu_kernels.error()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_builder_takes_its_compiler_down_and_frees_the_lock(cache, built):
    """SIGKILL the process in load() mid-compile (the real one): the compile child notices and
    kills its process group (ninja, g++), and the lock is free at once."""
    code = ("import json; from kernels import cpu_kernels as k\n"
            "k.load(on_event=lambda kind, f: print(json.dumps([kind, f]), flush=True))")
    builder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PAGEDSERVE_CACHE_DIR": os.path.dirname(cache)})
    kind, fields = json.loads(builder.stdout.readline())
    assert kind == "started"
    group = []
    deadline = time.monotonic() + 10
    while len(group) < 2 and time.monotonic() < deadline:  # the child and its compiler(s)
        time.sleep(0.2)
        procs = _processes()  # the child's process group: the one whose command line names build_dir
        pgids = {pgid for pid, (pgid, cmdline) in procs.items() if fields["build_dir"].encode() in cmdline}
        group = [pid for pid, (pgid, _) in procs.items() if pgid in pgids and _alive(pid)]
    assert len(group) >= 2, group
    builder.kill()
    builder.wait()
    _wait_dead(group)
    with open(os.path.join(cache, f"{cpu_kernels._build_name()}.lock")) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone still held it
    assert not os.path.exists(fields["path"])


def test_a_second_virtualenv_finds_the_build_without_rebuilding(built, tmp_path):
    base, result = built
    venv = tmp_path / "venv2"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The same torch and our code, from another sys.prefix and sys.executable.
    with open(os.path.join(purelib, "shared_main.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n{ROOT}\n")
    before = os.stat(result["path"])
    code = ("import json, sys; from dataclasses import asdict; from kernels import cpu_kernels as k\n"
            "assert k.load() is not None, k.error()\n"
            "print(json.dumps({**asdict(k.last_load()), 'prefix': sys.prefix, 'executable': sys.executable}))")
    proc = subprocess.run([python, "-c", code], env={**os.environ, "PAGEDSERVE_CACHE_DIR": base}, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["prefix"] != sys.prefix and got["executable"] != sys.executable
    assert got["action"] == "cached" and got["path"] == result["path"]
    assert (os.stat(result["path"]).st_ino, os.stat(result["path"]).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def _args(*flags: str) -> argparse.Namespace:
    build_kernels_cmd.add_arguments(parser := argparse.ArgumentParser())
    return parser.parse_args(list(flags))


def test_build_command_without_a_compiler_exits_0_unless_strict(cache, monkeypatch, capsys):
    _fake_compile(monkeypatch, "import sys; print('RuntimeError: Ninja is required', file=sys.stderr); sys.exit(1)")
    assert build_kernels_cmd.run(_args("--json")) == 0
    out, err = capsys.readouterr()
    assert "Ninja is required" in err and "torch path" in err
    assert json.loads(out)["action"] == "failed"
    monkeypatch.setattr(cpu_kernels, "_error", None)
    assert build_kernels_cmd.run(_args("--strict")) == 1
    assert "--strict" in capsys.readouterr().err


def test_build_command_builds_then_finds_it_cached(cache, monkeypatch, capsys, built):
    _copy_compile(monkeypatch, built)
    assert build_kernels_cmd.run(_args("--json", "--strict")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["action"] == "built" and "built in" in err
    monkeypatch.setattr(cpu_kernels, "_module", None)
    assert build_kernels_cmd.run(_args("--json")) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "cached"


def test_worker_logs_the_build_and_falls_back_to_torch(cache, monkeypatch):
    _fake_compile(monkeypatch, "import sys; sys.exit(1)")
    logged = []
    record = lambda event, **fields: logged.append((event, fields))
    monkeypatch.setattr(kernel_build, "log", argparse.Namespace(info=record, warning=record))
    status = kernel_build.prepare_cpu_kernel(timeout_s=30)
    assert status.startswith("failed: the compile failed (exit 1)")
    assert [e for e, _ in logged] == ["worker.kernel_build_started", "worker.kernel_build_failed"]
    assert logged[1][1]["fallback"] == "torch" and "exit 1" in logged[1][1]["reason"]
