"""The CPU decode kernel (kernels/cpu_kernels.py), built or found during the worker's model load.

Called before the worker says hello, so the first build (about a minute) shows up in the log as
events rather than as a silent start-up, and a SIGTERM during it stops it (`cancelled`). Never
raises and never blocks past its bounds: when the kernel cannot be had, the worker decodes on
the torch path (kernels/sdpa_paged.py), slower but the same tokens.

Events: `worker.kernel_build_waiting` (another process builds it), `worker.kernel_build_started`,
then `worker.kernel_build_finished` (action "built" or "cached", elapsed_s, path) or
`worker.kernel_build_failed` (reason; fallback "torch").
"""

from __future__ import annotations

from collections.abc import Callable

from shared.logging import get_logger

log = get_logger()



def prepare_cpu_kernel(timeout_s: float, cancelled: Callable[[], bool] | None = None,
                       lock_wait_s: float | None = None) -> str:
    """Build or find the kernel, logging its progress; returns "built", "cached" or
    "failed: <reason>". `timeout_s` bounds the compile and `lock_wait_s` the wait for another
    process's build (seconds); `cancelled()` is polled during both. Decided once per process:
    a later call (TorchAttentionBackend's own `cpu_kernels.load()`) gets the same answer at once.
    The worker passes `[worker] kernel_build_timeout_s` for both bounds (`lock_wait_s` None: the same)."""
    lock_wait_s = timeout_s if lock_wait_s is None else lock_wait_s
    from kernels import cpu_kernels  # imports torch

    def on_event(kind: str, fields: dict) -> None:
        if kind == "waiting":
            log.info("worker.kernel_build_waiting", lock=fields["lock"], holder_pid=fields["holder_pid"],
                     lock_wait_s=fields["lock_wait_s"])
        elif kind == "started":
            log.info("worker.kernel_build_started", path=fields["path"], timeout_s=fields["timeout_s"])
        elif kind == "finished":
            log.info("worker.kernel_build_finished", action=fields["action"], elapsed_s=fields["seconds"],
                     path=fields["path"])
        elif kind == "failed":
            log.warning("worker.kernel_build_failed", reason=fields["reason"], elapsed_s=fields["seconds"],
                        fallback="torch")

    try:
        cpu_kernels.load(timeout_s=timeout_s, lock_wait_s=lock_wait_s, cancelled=cancelled, on_event=on_event)
    except Exception as e:  # a logging failure must not stop the worker: the torch path works
        log.warning("worker.kernel_build_failed", reason=f"{type(e).__name__}: {e}", elapsed_s=0.0,
                    fallback="torch")
    result = cpu_kernels.last_load()
    if result is None or result.action == "failed":
        return f"failed: {cpu_kernels.error()}"
    return result.action


def cpu_kernel_status(backend) -> str:
    """For `worker.loaded`: "built" or "cached" (in use), "off" (not a CPU torch backend), or why not."""
    from kernels import cpu_kernels

    if getattr(backend, "cpu_kernel", False):
        return cpu_kernels.last_load().action
    return f"unavailable: {cpu_kernels.error()}" if cpu_kernels.error() else "off"
