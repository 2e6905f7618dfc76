"""The parallel section: tensor parallelism inside an engine replica, and how many replicas
`pagedserve serve` starts (data parallelism; the frontend's routing is shared/config_routing.py).
Moved out of shared/config.py to keep that file short."""

from __future__ import annotations

from typing import Annotated

from shared.config_base import _help, _Section


class ParallelConfig(_Section):
    """Tensor parallelism (docs/tensor_parallel.md) and data-parallel replicas (docs/data_parallel.md)."""

    tensor_parallel_size: Annotated[int, _help("worker ranks the model is split across (serve starts this many "
                                               "workers); must divide the model's attention heads", "N")] = 1
    rank: Annotated[int, _help("worker only: its rank on this host (systemd: the worker@ instance)", "N")] = 0
    rank_offset: Annotated[int, _help("worker only: added to --rank, the first rank on this host when ranks span "
                                      "hosts", "N")] = 0
    dist_init_addr: Annotated[str, _help("rank 0's torch.distributed rendezvous (default tcp://127.0.0.1:29500; "
                                         "serve picks a free port)", "tcp://HOST:PORT")] = ""
    dist_timeout_s: Annotated[float, _help("seconds the rendezvous, or any collective, may wait for a rank "
                                           "before the group fails", "SECONDS")] = 600.0

    data_parallel_size: Annotated[int, _help("serve only: engine replicas (a scheduler and its tensor_parallel_size "
                                             "workers each) behind the frontend, on this host", "N")] = 1

    @property
    def worker_rank(self) -> int:
        """This worker's rank in the tensor-parallel group."""
        return self.rank + self.rank_offset

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.rank < 0 or self.rank_offset < 0:
            raise ValueError(f"rank and rank_offset must be >= 0, got {self.rank} and {self.rank_offset}")
        if not 0 <= self.worker_rank < self.tensor_parallel_size:
            offset = f" + rank_offset {self.rank_offset}" if self.rank_offset else ""
            raise ValueError(f"rank {self.rank}{offset} must be in [0, {self.tensor_parallel_size}) "
                             f"(tensor_parallel_size {self.tensor_parallel_size})")
        if self.dist_init_addr and not self.dist_init_addr.startswith("tcp://"):
            raise ValueError(f"dist_init_addr must be tcp://HOST:PORT, got {self.dist_init_addr!r}")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
