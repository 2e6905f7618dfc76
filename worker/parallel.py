"""Tensor parallelism: which slice of the model a rank holds, and the collectives between ranks.

Megatron-style: q/k/v and gate/up are split by output rows (column-parallel: by heads for
attention), o and down by input columns (row-parallel, followed by an all-reduce), the embedding
and the LM head by vocabulary rows. Every rank ends each layer with the same hidden states, so
norms, RoPE and the residual stream are replicated, not split.

KV heads: with at least as many KV heads as ranks each rank holds its own share; with fewer, a
KV head is replicated on the `world_size / num_kv_heads` ranks whose query heads read it.

Collectives use torch.distributed (gloo on CPU, NCCL on CUDA), initialised over TCP from
`ServerConfig.dist_init_addr`, so ranks may sit on different hosts. Tensors only: no object
collectives (they pickle).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_DIST_INIT_ADDR = "tcp://127.0.0.1:29500"


class TensorParallelError(ValueError):
    """The model cannot be split `tensor_parallel_size` ways; the message says why and what can."""


@dataclass(frozen=True)
class ShardLayout:
    """What rank `rank` of `world_size` holds. Ranges are [start, end) in heads, channels or
    vocabulary rows of the full model."""

    rank: int
    world_size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]  # one head, shared with other ranks, when num_kv_heads < world_size
    intermediate: tuple[int, int]  # MLP channels (gate/up rows, down columns)
    vocab: tuple[int, int]  # real vocabulary rows; the shard is padded to `vocab_per_rank`
    vocab_per_rank: int  # ceil(vocab_size / world_size): every rank's shard has this many rows

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]


def _sizes_that_work(num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[int]:
    return [n for n in range(1, num_heads + 1)
            if num_heads % n == 0 and intermediate_size % n == 0 and (num_kv_heads % n == 0 or n % num_kv_heads == 0)]


def shard_layout(num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int,
                 rank: int, world_size: int, model: str = "the model") -> ShardLayout:
    """Raises TensorParallelError, naming the numbers that do not divide and the sizes that would."""
    n, problems = world_size, []
    if num_heads % n:
        problems.append(f"{n} does not divide its {num_heads} attention heads")
    if num_kv_heads % n and n % num_kv_heads:
        problems.append(f"{n} neither divides its {num_kv_heads} KV heads nor is a multiple of them")
    if intermediate_size % n:
        problems.append(f"{n} does not divide its MLP size {intermediate_size}")
    if problems:
        ok = ", ".join(map(str, _sizes_that_work(num_heads, num_kv_heads, intermediate_size)))
        raise TensorParallelError(f"tensor_parallel_size {n}: {model} cannot be split {n} ways: "
                                  f"{'; '.join(problems)}. Sizes that work: {ok}")
    q_per = num_heads // world_size
    if num_kv_heads >= world_size:
        kv_per = num_kv_heads // world_size
        kv = (rank * kv_per, (rank + 1) * kv_per)
    else:  # replicated: ranks [h * w / kv, (h + 1) * w / kv) share KV head h
        head = rank * num_kv_heads // world_size
        kv = (head, head + 1)
    inter_per = intermediate_size // world_size
    vocab_per = -(-vocab_size // world_size)
    vocab_start = min(rank * vocab_per, vocab_size)
    return ShardLayout(rank=rank, world_size=world_size, q_heads=(rank * q_per, (rank + 1) * q_per), kv_heads=kv,
                       intermediate=(rank * inter_per, (rank + 1) * inter_per),
                       vocab=(vocab_start, min(vocab_start + vocab_per, vocab_size)), vocab_per_rank=vocab_per)


class ParallelGroup:
    """This rank's view of the tensor-parallel group. With world_size 1 every collective is a
    no-op and no process group exists, so TP=1 runs exactly the single-device code."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @property
    def is_driver(self) -> bool:
        """Rank 0 samples and returns the tokens."""
        return self.rank == 0

    def init(self, init_addr: str, device: torch.device, timeout_s: float) -> None:
        """Join the group (blocks until every rank has joined, at most `timeout_s`).
        `timeout_s` also bounds every later collective: a rank that hangs fails the others."""
        if self.world_size == 1:
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cpu":
            # CPU ranks (tests, demos) usually share one host: N ranks each spinning up a thread
            # per core would oversubscribe it many times over, and every collective waits for the
            # slowest rank.
            torch.set_num_threads(max(1, torch.get_num_threads() // self.world_size))
        device_id = None
        if device.type == "cuda":  # NCCL binds one GPU per rank: name it ("cuda" alone has no index)
            device_id = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        dist.init_process_group(backend, init_method=init_addr or DEFAULT_DIST_INIT_ADDR, rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device_id)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (every rank gets the same bytes)."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(x, src)
        return x

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Vocabulary shards ``[rows, vocab_per_rank]`` of every rank -> ``[rows, vocab_size]`` on
        rank 0 (padding dropped); None on the other ranks."""
        if self.world_size == 1:
            return local
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.is_driver else None
        dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :vocab_size] if parts is not None else None
