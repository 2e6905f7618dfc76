"""Host<->device swap of KV blocks: torch copies, not a Triton kernel.

Why not Triton: a swap is bound by the PCIe/NVLink-C2C link, not by the GPU. ``Tensor.copy_``
between a device tensor and *pinned* host memory becomes a ``cudaMemcpyAsync`` on the copy
engine: it runs at link speed, is ordered on the current stream (no host sync), and leaves the
SMs to the model. A Triton kernel would have to read host memory through mapped (zero-copy)
pointers, occupy SMs for the whole transfer, and could not reach the copy engine's rate with
small per-block transactions. So this module only shapes the copies well: runs of consecutive
block ids on both sides become one copy each, so swapping a sequence's blocks (usually
allocated together) costs a few large transfers rather than one per block.

Layout: ``[num_blocks, block_size, num_kv_heads, head_dim]`` on both sides; a block is
contiguous, so a run of blocks is one contiguous span of ``run * block_bytes`` bytes.
"""

from __future__ import annotations

import torch


def block_runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst) pairs -> (src_start, dst_start, length) runs where both ids step by one, in order."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if runs:
            s0, d0, n = runs[-1]
            if src == s0 + n and dst == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, pairs: torch.Tensor) -> None:
    """Copy blocks between two caches, e.g. device -> host (swap out) or host -> device (swap in).

    Same contract as kernels.reference.swap_blocks: src, dst ``[num_blocks_*, block_size,
    num_kv_heads, head_dim]`` (any devices, same dtype and block shape); pairs: int64
    ``[num_pairs, 2]`` (src block id, dst block id) on the CPU.

    Across devices each run is copied with ``non_blocking=True``: asynchronous and stream-ordered
    when the host side is pinned (the worker pins its swap space), a plain synchronous copy when
    it is not. Readers of the destination on the host must synchronize the stream first; the
    worker only reads it back through a later swap-in on the same stream. When src and dst share
    storage (one cache), every source is gathered before any destination is written (the
    reference's semantics); otherwise runs are copied directly.
    """
    if pairs.numel() == 0:
        return
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"swap between different block layouts: {tuple(src.shape)} {src.dtype} -> "
                         f"{tuple(dst.shape)} {dst.dtype}")
    if src.device == dst.device and src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
        src_ids = pairs[:, 0].long().to(src.device)
        dst_ids = pairs[:, 1].long().to(dst.device)
        dst.index_copy_(0, dst_ids, src.index_select(0, src_ids))
        return
    for s, d, n in block_runs([(int(a), int(b)) for a, b in pairs.tolist()]):
        dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
