"""C++ CPU kernels (kernels/csrc/), compiled once per machine with torch's extension builder.

Why C++ here: on a CPU, decode attention is bound by memory traffic, and torch ops can only
read a paged cache by gathering it into a copy first (read, write, read again). The kernel reads
each K/V row in place through the block table, so a decode step reads the KV cache once.

The build (g++ and ninja, about a minute) happens once per machine, source, flags, torch and
Python version, whichever virtualenv asks (the build name hashes exactly those, no path), under
$PAGEDSERVE_CACHE_DIR, else systemd's $CACHE_DIRECTORY, else ~/.cache/pagedserve. It can never
wedge a start-up: kernels/cpu_build.py locks with flock (dropped when its holder dies), compiles
in a child process in a private directory, publishes the .so atomically, and bounds every wait.
Where it cannot be built, `load()` returns None and callers keep the torch path
(kernels/sdpa_paged.py). kernels/ imports nothing of ours outside kernels/: progress reaches a
caller's log through `load(on_event=...)`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import cpu_build

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCE = os.path.join(_CSRC, "paged_decode_cpu.cpp")  # the bindings; includes the headers below
_SOURCES = [_SOURCE] + [os.path.join(_CSRC, name) for name in ("paged_decode_kernel.h", "simd_cpu.h",
                                                              "layer_ops_cpu.h", "layer_ops_kernel.h")]
# -ffp-contract=off: a * b + c stays two rounded ops, as torch computes it (the fused layer ops
# match torch bit for bit); the attention kernel asks for its FMAs explicitly.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]
DEFAULT_TIMEOUT_S = 600.0  # the compile, seconds (about a minute on 2 cores)
DEFAULT_LOCK_WAIT_S = 600.0  # waiting for another process's compile, seconds

_lock = threading.Lock()
_module = None
_error: str | None = None


@dataclass(frozen=True)
class LoadResult:
    """What the last `load()` did: action "built" (compiled here), "cached" (found built, by any
    process), or "failed" (then `error` says why); `seconds` it took; `path` of the .so."""

    action: str
    seconds: float
    path: str
    error: str | None = None


_last: LoadResult | None = None


def cache_dir() -> str:
    base = (os.environ.get("PAGEDSERVE_CACHE_DIR") or os.environ.get("CACHE_DIRECTORY")
            or os.path.join(os.path.expanduser("~"), ".cache", "pagedserve"))
    return os.path.join(base, "torch_extensions")


def _cpu_model() -> str:
    """The first CPU's model name and feature flags (-march=native code is CPU-specific)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
    except OSError:
        return platform.processor()
    return "".join(lines[:2])


def _build_name() -> str:
    """Changes with the source bytes, the flags, torch, the Python ABI, the machine and the CPU;
    never with a path, so every virtualenv with the same torch and Python shares one build."""
    digest = hashlib.sha256()
    for path in _SOURCES:  # the source and the headers it includes
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    python_abi = f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}"
    for part in (" ".join(_FLAGS), " ".join(_LDFLAGS), torch.__version__, python_abi, platform.machine(),
                 _cpu_model()):
        digest.update(b"\0" + part.encode())
    return f"pagedserve_cpu_{digest.hexdigest()[:12]}"


def load(*, timeout_s: float = DEFAULT_TIMEOUT_S, lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
         cancelled: Callable[[], bool] | None = None, on_event: Callable[[str, dict], None] | None = None):
    """The compiled module, or None (then `error()` says why, and `last_load()` what happened).

    Thread-safe; decides once per process (later calls return the same answer at once).
    Waits at most `lock_wait_s` seconds for another process's build of the same kernel, then
    compiles for at most `timeout_s` seconds; `cancelled()`, when given, is polled (every 0.1 s)
    during both and stops them. `on_event(kind, fields)` is called with "waiting" (lock,
    holder_pid, lock_wait_s) when another process builds, "started" (name, path, timeout_s) when
    this one compiles, then "finished" (action, seconds, path) or "failed" (reason, seconds, path).
    """
    global _module, _error, _last
    with _lock:
        if _module is not None or _error is not None:
            return _module
        emit = on_event or (lambda kind, fields: None)
        started = time.monotonic()
        name = _build_name()
        path = cpu_build.so_path(cache_dir(), name)
        try:
            action, path = cpu_build.build(name, _SOURCE, _FLAGS, _LDFLAGS, cache_dir(), timeout_s, lock_wait_s,
                                           cancelled or (lambda: False), emit)
            module = cpu_build.import_extension(name, path)
        except cpu_build.BuildError as e:
            _error = str(e)
        except Exception as e:  # no compiler, read-only cache, a broken .so: the torch path still works
            text = str(e).strip()
            _error = f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"
        seconds = round(time.monotonic() - started, 3)
        if _error is not None:
            _last = LoadResult("failed", seconds, path, _error)
            emit("failed", {"reason": _error, "seconds": seconds, "path": path})
            return None
        _module = module
        _last = LoadResult(action, seconds, path)
        emit("finished", {"action": action, "seconds": seconds, "path": path})
        return _module


def error() -> str | None:
    return _error


def last_load() -> LoadResult | None:
    """What this process's `load()` did; None before it ran."""
    return _last


def loaded():
    """The compiled module if `load()` has succeeded in this process, else None (never builds)."""
    return _module


def supports(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """The kernel's domain: CPU tensors, a float32 or bfloat16 cache (the query in the same dtype),
    contiguous caches, head_dim innermost."""
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)
            and key_cache.dtype == query.dtype and key_cache.is_contiguous() and query.stride(-1) == 1)


def paged_decode_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale: float) -> None:
    """As kernels/reference.py's, for `supports(query, key_cache)` inputs, after `load()` succeeded.

    The kernel computes in float32: a bfloat16 query is widened first and the float32 result
    rounded into `out` (both [batch, heads, head_dim], small next to the cache it reads), inside
    the C++ call."""
    if query.shape[0] == 0:
        return
    tables, lens = block_tables.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    _module.paged_decode_f32(out, query, key_cache, value_cache, tables, lens, float(scale))
