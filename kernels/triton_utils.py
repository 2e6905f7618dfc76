"""Host-side helpers shared by the Triton kernels: tile sizes, dot precision, device facts.

Nothing here launches a kernel. Under ``TRITON_INTERPRET=1`` (CPU tests) kernels run in numpy one
program at a time, so the helpers pick small tiles and few programs there; on CUDA they pick
tiles for an H100-class GPU (to be tuned by the GPU benchmark, bench/kernels.py).
"""

from __future__ import annotations

import functools
import os

import torch

# tl.dot needs every dimension >= 16 when compiled for NVIDIA GPUs; the interpreter does not,
# but tiles are padded to this size everywhere so one kernel source serves both.
MIN_DOT = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact ("ieee") products, so fp32 results match the fp32 reference; fp16/bf16
    inputs are exact on tensor cores anyway, so keep Triton's default there."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs
    one at a time, so more programs only cost more)."""
    if device.type != "cuda" or interpreting():
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """K and V caches must agree and have a unit stride on head_dim (the kernels vectorize it)."""
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key/value caches differ: {tuple(key_cache.shape)} {key_cache.dtype} vs "
                         f"{tuple(value_cache.shape)} {value_cache.dtype}")
    if key_cache.dim() != 4 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("caches must be [num_blocks, block_size, num_kv_heads, head_dim] with unit stride on head_dim")
