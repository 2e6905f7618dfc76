"""`pagedserve serve`: every role as a child process of one supervisor.

For a laptop, CI and demos. Under systemd each role is its own unit instead.
With --tensor-parallel-size N it starts N workers, ranks 0 .. N-1, on this host: their
rendezvous is a free loopback port unless --dist-init-addr is given, and with --device cuda
rank r drives the r-th visible GPU (cuda:r). With --data-parallel-size D it starts D engine
replicas (a scheduler and its workers each, children "scheduler-k", "worker<r>-k", sockets in
RUN_DIR/replica<k>), and the frontend routes between them (docs/data_parallel.md).
Children inherit stdout, so all JSON events arrive on one stream.

A child that dies is restarted (docs/fault_tolerance.md), after a back-off that
doubles with each restart in the last RESTART_WINDOW_S: the other roles recover
around it (a worker's sequences are recomputed, a restarted scheduler is sent the
frontend's requests again). With tensor parallelism the whole worker group
restarts when one rank dies. Exceptions, which stop the server with exit 1: a
child that dies in its first run before it ever said READY=1 (a start-up error:
restarting would repeat it), and a crash loop (MAX_RESTARTS within the window).
Readiness comes over the notify protocol: each child gets its own NOTIFY_SOCKET
(launcher/children.py), as systemd would give it.

Stopping (SIGTERM or SIGINT) is ordered so in-flight requests really finish:
1. the frontend: it refuses new requests (`shutting_down`) and waits for its
   in-flight ones, which still need the scheduler and the workers;
2. then the scheduler: nothing is left in flight, so it tells the workers to
   shut down and exits;
3. then the workers (normally gone already, after the scheduler's Shutdown).
Each stage gets drain_timeout_s + STOP_GRACE_S before it is killed. A second
signal is forwarded to the stage being waited on: the frontend then aborts what
is still in flight (finish_reason "abort") at once.

Children run in their own process group, so a terminal's Ctrl-C reaches only
the supervisor, which then stops them in order; if the supervisor dies, even by
SIGKILL, the kernel sends each child SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from launcher.children import MAX_RESTARTS, Child, Children
from shared.config import ServerConfig
from shared.drain import Drain
from shared.logging import get_logger
from shared.sdnotify import child_environment

log = get_logger()

STOP_GRACE_S = 10.0  # beyond drain_timeout_s, per stage, before SIGKILL
POLL_S = 0.1


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


def _free_port() -> int:
    """A TCP port free on loopback now, for the workers' rendezvous (rank 0 binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_flags(base: list[str], config: ServerConfig, rank: int, replica: int = 0) -> list[str]:
    """Rank r of a CUDA group drives the r-th visible GPU (`--device cuda:r`), of replica k the
    (k * tensor_parallel_size + r)-th. Every GPU stays visible to every rank, so NCCL can use
    peer-to-peer copies between them."""
    flags = base + ["--rank", str(rank)]
    par = config.parallel
    if (par.tensor_parallel_size > 1 or par.data_parallel_size > 1) and config.worker.device == "cuda":
        flags = _strip_flag(flags, "--device") + ["--device", f"cuda:{replica * par.tensor_parallel_size + rank}"]
    return flags


def _replica_names(config: ServerConfig, k: int) -> tuple[str, list[str]]:
    """(scheduler, workers) child names of replica k: "scheduler", "worker0", ... with one replica,
    "scheduler-k", "worker0-k", ... with several."""
    suffix = f"-{k}" if config.parallel.data_parallel_size > 1 else ""
    return f"scheduler{suffix}", [f"worker{r}{suffix}" for r in range(config.parallel.tensor_parallel_size)]


def run_supervisor(config: ServerConfig, argv: list[str], role_command: list[str],
                   pid_file: str | None = None) -> int:
    """`argv`: serve's own flags, passed on to every child (`--config` included; `--pid-file`
    is serve's alone); `role_command`: how to start a role, e.g. [python, path/to/pagedserve];
    `pid_file`: where to write this process's pid while it runs (`kill $(cat FILE)` stops
    exactly this server)."""
    if pid_file:
        _write_pid_file(pid_file)
    try:
        return _supervise(config, _strip_flag(argv, "--pid-file"), role_command)
    finally:
        if pid_file:
            _remove_pid_file(pid_file)


def _write_pid_file(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # a reader never sees a half-written pid


def _remove_pid_file(path: str) -> None:
    try:
        with open(path) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:  # another server may have taken the path since
            os.unlink(path)
    except OSError:
        pass


def _supervise(config: ServerConfig, argv: list[str], role_command: list[str]) -> int:
    own_run_dir = not config.endpoints.run_dir
    run_dir = tempfile.mkdtemp(prefix="pagedserve-") if own_run_dir else config.endpoints.run_dir
    os.makedirs(run_dir, mode=0o750, exist_ok=True)
    base = argv
    for flag in ("--run-dir", "--rank", "--rank-offset"):  # one host: ranks 0 .. N-1
        base = _strip_flag(base, flag)
    replicas = config.parallel.data_parallel_size
    if replicas > 1:  # each replica's sockets in a directory of its own; the frontend gets them all
        for flag in ("--scheduler-frontend-addr", "--scheduler-worker-addr", "--engines", "--dist-init-addr"):
            base = _strip_flag(base, flag)
    run_dirs = [run_dir] if replicas == 1 else [os.path.join(run_dir, f"replica{k}") for k in range(replicas)]
    own_dist_port = config.parallel.tensor_parallel_size > 1 and (replicas > 1 or not config.parallel.dist_init_addr)
    env = child_environment()  # only a process systemd started may speak to systemd

    def worker_argv(k: int, rank: int) -> list[str]:
        flags = base + ["--run-dir", run_dirs[k]]
        flags += ["--dist-init-addr", f"tcp://127.0.0.1:{dist_ports[k]}"] if own_dist_port else []
        return role_command + ["worker"] + _worker_flags(flags, config, rank, k)

    dist_ports = [_free_port() if own_dist_port else 0 for _ in range(replicas)]
    children = Children(run_dir, env)
    groups: list[list[Child]] = []  # each replica's workers
    for k in range(replicas):
        scheduler_name, worker_names = _replica_names(config, k)
        children.add(scheduler_name, role_command + ["scheduler"] + base + ["--run-dir", run_dirs[k]])
        groups.append([children.add(name, worker_argv(k, r)) for r, name in enumerate(worker_names)])
    engines = [] if replicas == 1 else ["--engines", ",".join(f"ipc://{d}/scheduler-frontend.sock" for d in run_dirs)]
    children.add("frontend", role_command + ["frontend"] + base + ["--run-dir", run_dir] + engines)
    workers = [c for group in groups for c in group]

    # Each stage gets its own deadline (below); the Drain counts the signals and says when to begin.
    drain = Drain(config.operations.drain_timeout_s + STOP_GRACE_S)
    drain.install()
    for child in children:
        child.start()
    log.info("supervisor.started", run_dir=run_dir, listen=config.endpoints.listen, children=children.pids())
    code = 0
    while drain.poll() is None:
        children.read_notifications()
        dead = [c for c in children if c.exited()]
        if any(not _restartable(c) for c in dead):
            for c in dead:
                log.error("supervisor.child_exited", child=c.name, exit_code=c.proc.returncode, action="stop",
                          ready=c.ever_ready)
            code = 1
            break
        for k, group in enumerate(groups):
            if not any(c in group for c in dead) or len(group) == 1:
                continue
            # One rank lost: its peers' torch.distributed group is broken too. Restart them all.
            for c in group:
                if c in dead or c.restart_pending:
                    continue
                if c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait()
                dead.append(c)
            if own_dist_port:
                dist_ports[k] = _free_port()  # the old rendezvous port may linger in TIME_WAIT
                for r, c in enumerate(group):
                    c.argv = worker_argv(k, r)
        for c in dead:
            delay_s = c.schedule_restart()
            log.error("supervisor.child_exited", child=c.name, exit_code=c.proc.returncode, action="restart",
                      ready=c.ever_ready, restart_in_s=delay_s)
        for c in children:
            if c.restart_due():
                c.start()
                log.info("supervisor.child_restarted", child=c.name, pid=c.proc.pid, restarts=c.num_restarts)
        time.sleep(POLL_S)
    log.info("supervisor.stopping", reason="signal" if drain.signals else "child_exited")
    stages = [["frontend"], [_replica_names(config, k)[0] for k in range(replicas)], [c.name for c in workers]]
    for stage in stages:
        procs = {n: children[n].proc for n in stage if not children[n].restart_pending}
        if not _stop_stage(procs, drain.timeout_s, drain):
            code = 1
    children.close()
    if own_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("supervisor.stopped", exit_code=code,
             children_exit_codes={c.name: c.proc.returncode for c in children if not c.restart_pending})
    return code


def _restartable(child: Child) -> bool:
    """A child that died before it was ever ready, in its first run, has a start-up problem
    (bad flags, a model that does not load): restarting would only repeat it. Past that, restart
    unless it was restarted MAX_RESTARTS times within RESTART_WINDOW_S (a crash loop)."""
    if not child.ever_ready and child.num_restarts == 0:
        return False
    return child.recent_restarts() < MAX_RESTARTS


def _stop_stage(stage: dict[str, subprocess.Popen], grace_s: float, drain: Drain) -> bool:
    """SIGTERM the stage's running children and wait; forward a further signal; kill
    at the deadline. True when every child of the stage exited 0 (or had exited 0)."""
    for c in stage.values():
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    seen = drain.signals
    deadline = time.monotonic() + grace_s
    while any(c.poll() is None for c in stage.values()):
        if drain.signals > seen:  # another signal: the stage should stop now, not drain
            seen = drain.signals
            for c in stage.values():
                if c.poll() is None:
                    c.send_signal(signal.SIGTERM)
        if time.monotonic() >= deadline:
            for name, c in stage.items():
                if c.poll() is None:
                    log.error("supervisor.child_killed", child=name, after_s=grace_s)
                    c.kill()
                    c.wait()
            break
        time.sleep(POLL_S)
    return all(c.returncode == 0 for c in stage.values())
