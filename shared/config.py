"""Server configuration: one typed struct read by every role.

Every role (`serve`, `scheduler`, `worker`, `frontend`) takes the same flags, so
each can be started on its own and still agree with the others on sockets,
block size and limits. Units are in the field names or comments.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, Literal

import msgspec

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # model
    model: str = "default"  # "default", a Hugging Face directory, or a .gguf file
    dtype: Dtype = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    attention_backend: str = "auto"  # "auto" (triton on CUDA, torch on CPU), "torch" or "triton"
    cpu_linear: str = "auto"  # CPU matmuls: "auto"/"onednn" (weights packed once for oneDNN) or "torch" (F.linear)
    enforce_eager: bool = False  # CUDA: no CUDA graphs; every decode step launches its kernels one by one
    load_format: str = "auto"  # "auto": weights from the model's files; "dummy": random weights of its config
    max_model_len: int | None = None  # tokens; None: the model's own limit
    seed: int = 0  # default seed for requests without one (per-request randomness still differs)

    # sockets
    listen: str = "tcp://127.0.0.1:8765"  # client endpoint (frontend binds it)
    run_dir: str = ""  # directory of the ipc sockets; "" -> default_run_dir()
    scheduler_frontend_addr: str = ""  # "" -> ipc://RUN_DIR/scheduler-frontend.sock
    scheduler_worker_addr: str = ""  # "" -> ipc://RUN_DIR/scheduler-worker.sock

    # KV cache
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # overrides the measured device capacity
    kv_cache_memory_gib: float | None = None  # CPU: KV budget; None: a share of free memory
    gpu_memory_utilization: float = 0.90  # CUDA: share of total device memory we may use

    # scheduling
    max_num_seqs: int = 128  # sequences in one step
    max_num_batched_tokens: int | None = None  # tokens in one step; None: max(max_model_len, 2048)

    # memory manager
    enable_chunked_prefill: bool = True  # prefill long prompts over several steps, within the token budget
    enable_prefix_caching: bool = True  # reuse computed KV blocks of identical prompt prefixes
    preemption_mode: Literal["recompute", "swap"] = "recompute"  # swap falls back to recompute without host room
    swap_space_gib: float = 0.0  # host memory per worker for swapped-out KV blocks, GiB

    # topology (docs/tensor_parallel.md)
    tensor_parallel_size: int = 1  # worker ranks; the model is split this many ways
    rank: int = 0  # worker role only: its rank on this host (systemd: the worker@ instance, its GPU)
    rank_offset: int = 0  # worker role only: added to `rank`; the first rank on this host when ranks span hosts
    dist_init_addr: str = ""  # rank 0's torch.distributed rendezvous, tcp://HOST:PORT; "" -> tcp://127.0.0.1:29500
    dist_timeout_s: float = 600.0  # the rendezvous, and any collective: a rank stuck longer fails the group

    # operations
    stats_interval_s: float = 10.0
    log_level: str = "info"
    drain_timeout_s: float = 30.0  # SIGTERM: seconds in-flight requests get to finish before they are aborted

    # failures (docs/fault_tolerance.md)
    heartbeat_timeout_s: float = 30.0  # a worker silent this long (a step included) counts as dead or hung
    max_waiting: int = 4096  # requests queued for admission at most; past it a new one is refused "overloaded"
    max_client_requests: int = 1024  # requests in flight per client connection; past it that client gets "overloaded"

    # security (shared/curve.py): CURVE on the client endpoint, both or neither
    curve_secret_key_file: str = ""  # the frontend's .key_secret file (pagedserve keygen)
    curve_clients_dir: str = ""  # directory of the allowed clients' public .key files

    def resolved_run_dir(self) -> str:
        return self.run_dir or default_run_dir()

    def frontend_addr(self) -> str:
        return self.scheduler_frontend_addr or f"ipc://{self.resolved_run_dir()}/scheduler-frontend.sock"

    def worker_addr(self) -> str:
        return self.scheduler_worker_addr or f"ipc://{self.resolved_run_dir()}/scheduler-worker.sock"

    @property
    def worker_rank(self) -> int:
        """This worker's rank in the tensor-parallel group."""
        return self.rank + self.rank_offset

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
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
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.swap_space_gib >= 0.0:
            raise ValueError(f"swap_space_gib must be >= 0, got {self.swap_space_gib}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.cpu_linear not in ("auto", "onednn", "torch"):
            raise ValueError(f"cpu_linear must be auto, onednn or torch, got {self.cpu_linear!r}")
        if self.cpu_linear == "onednn" and self.device != "cpu":
            raise ValueError(f"cpu_linear onednn needs device cpu, got {self.device!r} (auto packs on CPU only)")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not self.heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {self.heartbeat_timeout_s}")
        if bool(self.curve_secret_key_file) != bool(self.curve_clients_dir):
            raise ValueError("curve_secret_key_file and curve_clients_dir go together: set both or neither")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.max_client_requests < 1:
            raise ValueError(f"max_client_requests must be >= 1, got {self.max_client_requests}")
        if self.stats_interval_s <= 0:
            raise ValueError(f"stats_interval_s must be > 0, got {self.stats_interval_s}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")


def default_run_dir() -> str:
    """systemd's RuntimeDirectory when set, else a per-user directory under /tmp."""
    return os.environ.get("RUNTIME_DIRECTORY") or f"/tmp/pagedserve-{os.getuid()}"


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """The TOML file at `path` (flat: its keys are ServerConfig's field names), then
    `overrides` on top (command-line flags; strings are converted, "16" -> 16).

    Raises ConfigError naming the file, the key and the problem."""
    from_file: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                from_file = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    try:
        config = msgspec.convert(from_file, ServerConfig)  # TOML is typed: no "16" for 16 here
    except msgspec.ValidationError as e:
        raise ConfigError(f"config file {path}: {_name_the_key(e)}") from None
    if overrides:
        try:
            given = msgspec.convert(overrides, ServerConfig, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"command line: {_name_the_key(e)}") from None
        config = msgspec.structs.replace(config, **{k: getattr(given, k) for k in overrides})
    try:
        config.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config


def _name_the_key(e: msgspec.ValidationError) -> str:
    """msgspec says `... - at `$.block_size``; say `block_size: ...` instead."""
    text = str(e)
    message, sep, where = text.rpartition(" - at `$.")
    return f"{where.rstrip('`')}: {message}" if sep else text
