"""The paged KV cache: how many blocks fit, and the per-layer K and V tensors that hold them.

A block holds `block_size` tokens of K and V for every layer, so
``bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes``.
Under tensor parallelism `num_kv_heads` is this rank's (worker/parallel.py): every rank holds
its heads' share of every block, and block ids mean the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.config import ServerConfig

GIB = 1 << 30
CPU_DEFAULT_MAX_BYTES = 4 * GIB
CPU_DEFAULT_SHARE = 0.30  # of MemAvailable, when no kv_cache_memory_gib is given


@dataclass
class KVCache:
    """Per layer: K and V ``[num_blocks, block_size, num_kv_heads, head_dim]``. Slot of a token:
    ``block_id * block_size + offset``."""

    key_caches: list[torch.Tensor]
    value_caches: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.key_caches[0].shape[0] if self.key_caches else 0

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.key_caches, self.value_caches))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.key_caches, *self.value_caches))


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V of one block across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device, pin_memory: bool = False) -> KVCache:
    """Zero-filled, so a never-written slot is finite (the references mask it out anyway)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def make() -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)

    return KVCache([make() for _ in range(num_layers)], [make() for _ in range(num_layers)])


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel could give us without swapping)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def kv_cache_budget_bytes(config: ServerConfig, device: torch.device, weights_bytes: int,
                          activation_peak_bytes: int) -> int:
    """Bytes we may spend on KV blocks on `device` (before `config.worker.num_kv_blocks` overrides).

    CPU: ``kv_cache_memory_gib``, else min(4 GiB, 30% of MemAvailable) (weights are already
    loaded, so MemAvailable is net of them). CUDA: ``total * gpu_memory_utilization - weights -
    activation peak``, never more than what is free now.
    """
    if device.type == "cpu":
        if config.worker.kv_cache_memory_gib is not None:
            return int(config.worker.kv_cache_memory_gib * GIB)
        return min(CPU_DEFAULT_MAX_BYTES, int(CPU_DEFAULT_SHARE * mem_available_bytes()))
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * config.worker.gpu_memory_utilization) - weights_bytes - activation_peak_bytes
    return max(0, min(budget, free))


def plan_num_blocks(config: ServerConfig, budget_bytes: int, block_bytes: int) -> int:
    """Blocks to allocate: `config.worker.num_kv_blocks` if set, else what fits the budget."""
    if config.worker.num_kv_blocks is not None:
        return config.worker.num_kv_blocks
    num_blocks = budget_bytes // block_bytes
    if num_blocks < 1:
        raise RuntimeError(
            f"no room for a single KV block: budget {budget_bytes} bytes, a block needs {block_bytes} bytes"
        )
    return num_blocks
