"""C++ CPU kernels (kernels/csrc/), compiled on first use with torch's extension builder.

Why C++ here: on a CPU, decode attention is bound by memory traffic, and torch ops can only
read a paged cache by gathering it into a copy first (read, write, read again). The kernel reads
each K/V row in place through the block table, so a decode step reads the KV cache once.

The build (g++ and ninja, about a minute) happens once per machine and source version, under
$PAGEDSERVE_CACHE_DIR, else systemd's $CACHE_DIRECTORY, else ~/.cache/pagedserve. Where it
cannot be built, `load()` returns None and callers keep the torch path (kernels/sdpa_paged.py).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading

import torch

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "paged_decode_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_module = None
_error: str | None = None


def cache_dir() -> str:
    base = (os.environ.get("PAGEDSERVE_CACHE_DIR") or os.environ.get("CACHE_DIRECTORY")
            or os.path.join(os.path.expanduser("~"), ".cache", "pagedserve"))
    return os.path.join(base, "torch_extensions")


def _build_name() -> str:
    """Changes with the source, the flags, torch and the CPU (-march=native code is CPU-specific)."""
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read())
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    for part in (" ".join(_FLAGS), torch.__version__, platform.machine(), cpu):
        digest.update(part.encode())
    return f"pagedserve_cpu_{digest.hexdigest()[:12]}"


def load():
    """The compiled module, or None (then `error()` says why). Thread-safe; builds at most once
    per process, and torch's builder locks the build directory across processes."""
    global _module, _error
    with _lock:
        if _module is not None or _error is not None:
            return _module
        try:
            from torch.utils.cpp_extension import load as load_extension

            # ninja may come from the virtualenv (the `ninja` package) rather than the system.
            bin_dir = os.path.dirname(sys.executable)
            if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
            build_dir = os.path.join(cache_dir(), _build_name())
            os.makedirs(build_dir, exist_ok=True)
            _module = load_extension(_build_name(), [_SOURCE], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                                     build_directory=build_dir, verbose=False)
        except Exception as e:  # no compiler, no ninja, read-only cache: the torch path still works
            _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return _module


def error() -> str | None:
    return _error


def supports(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """The kernel's domain: CPU tensors, a float32 or bfloat16 cache (the query in the same dtype),
    contiguous caches, head_dim innermost."""
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)
            and key_cache.dtype == query.dtype and key_cache.is_contiguous() and query.stride(-1) == 1)


def paged_decode_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale: float) -> None:
    """As kernels/reference.py's, for `supports(query, key_cache)` inputs, after `load()` succeeded.

    The kernel computes in float32: a bfloat16 query is widened first and the float32 result
    rounded into `out` (both [batch, heads, head_dim], small next to the cache it reads)."""
    if query.shape[0] == 0:
        return
    tables, lens = block_tables.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    if query.dtype == torch.float32:
        _module.paged_decode_f32(out, query, key_cache, value_cache, tables, lens, float(scale))
        return
    result = torch.empty(query.shape, dtype=torch.float32)
    _module.paged_decode_f32(result, query.float(), key_cache, value_cache, tables, lens, float(scale))
    out.copy_(result)
