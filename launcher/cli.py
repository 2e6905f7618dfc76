"""`pagedserve`: the one entry point that may start any role.

    pagedserve serve      all roles as child processes of one supervisor
    pagedserve scheduler  | worker | frontend   one role (same flags as serve)
    pagedserve generate --server ADDR "prompt"  stream an answer through the SDK
    pagedserve stats --server ADDR             health and live counters, as a table
    pagedserve keygen DIR [--name NAME]        a CURVE key pair for the client endpoint or a client
    pagedserve build-kernels                   build the CPU decode kernel ahead of serving
    pagedserve bench throughput|serve          benchmarks against peers (bench/cli.py)

Settings come from `--config FILE` (TOML, one table per section of ServerConfig),
then the flags on top (launcher/flags.py). A bad file, key or value stops start-up with a message naming
it (exit 2). A role that meets a fatal error logs `<role>.fatal` and exits 1, so
systemd's Restart=on-failure fires.

Role modules are imported only inside the chosen command, so `pagedserve stats`
never imports torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from launcher.flags import add_server_flags, config_from_args, config_reloader
from shared.config import ServerConfig

ROLES = ("serve", "scheduler", "worker", "frontend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="A PagedAttention LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)
    for role in ROLES:
        role_parser = sub.add_parser(role, help=f"run the {role}" if role != "serve" else
                                     "run every role under one supervisor")
        if role == "serve":
            role_parser.add_argument("--pid-file", metavar="FILE", default=None,
                                     help="write serve's pid here while it runs: `kill $(cat FILE)` stops exactly "
                                          "this server (SIGTERM drains)")
        add_server_flags(role_parser)
    from launcher.generate_cmd import add_arguments as add_generate_arguments

    add_generate_arguments(sub.add_parser("generate", help="stream an answer from a running server"))
    st = sub.add_parser("stats", help="print a running server's health and counters")
    st.add_argument("--server", default="tcp://127.0.0.1:8765", metavar="tcp://HOST:PORT",
                    help="the frontend's client endpoint (default: tcp://127.0.0.1:8765)")
    st.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                    help="seconds to wait for each reply (default: 10)")
    st.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    kg = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key (public) and NAME.key_secret (0600)")
    kg.add_argument("directory", help="where to write the two files")
    kg.add_argument("--name", default="server", metavar="NAME", help="file name stem (default: server)")
    from launcher import build_kernels_cmd

    build_kernels_cmd.add_arguments(sub.add_parser(
        "build-kernels", help="build the CPU decode kernel once per machine and torch version, ahead of serving"))
    # Listed for --help; `main` hands `bench ...` to bench/cli.py's own parser before parsing.
    sub.add_parser("bench", help="benchmarks against peers: `pagedserve bench --help`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: bench/cli.py (part of the package, torch only inside)
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        from launcher.generate_cmd import run_generate

        return run_generate(args)
    if args.command == "stats":
        from launcher.stats_cmd import run_stats

        return run_stats(args)
    if args.command == "keygen":
        from launcher.keygen_cmd import run_keygen

        return run_keygen(args)
    if args.command == "build-kernels":
        from launcher.build_kernels_cmd import run

        return run(args)
    config = config_from_args(args)
    if args.command in ("serve", "worker", "frontend"):
        _check_model_or_exit(args.command, config)
    if args.command == "serve" and config.frontend.http_listen:
        _check_http_or_exit(config)
    from shared.logging import configure_logging, get_logger

    configure_logging(args.command, config.operations.log_level)
    try:
        return _run_role(args.command, config, argv, getattr(args, "pid_file", None), config_reloader(args))
    except Exception:
        # Any fatal error: one JSON event with the traceback, then a non-zero exit.
        get_logger().exception(f"{args.command}.fatal")
        return 1
    finally:
        # The role is done; interpreter teardown (torch's takes seconds) resets Python-level
        # handlers to the default, so a late SIGTERM would turn our exit code into -15.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_role(command: str, config: ServerConfig, argv: list[str] | None, pid_file: str | None,
              reload=None) -> int:
    if command == "serve":
        from launcher.supervisor import run_supervisor

        return run_supervisor(config, sys.argv[2:] if argv is None else argv[1:], _role_command(), pid_file)
    if command == "scheduler":
        from scheduler.loop import run_scheduler

        return run_scheduler(config)
    if command == "worker":
        from worker.loop import run_worker

        return run_worker(config)
    from frontend.main import run_frontend

    return run_frontend(config, reload)


def _check_model_or_exit(command: str, config: ServerConfig) -> None:
    """A model that is not there is a configuration error: one line, exit 2, before any role
    starts (a role would only fail later, inside a JSON traceback)."""
    from shared.models import ModelNotFound, resolve_model

    try:
        resolve_model(config.model.model)
    except ModelNotFound as e:
        print(f"pagedserve {command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_http_or_exit(config: ServerConfig) -> None:
    """An HTTP listener that would refuse to start (a non-loopback address without API keys)
    stops `serve` before any role starts, as the frontend alone would (frontend/main.py)."""
    from frontend.http.auth import HttpConfigError, keys_for

    try:
        keys_for(config.frontend)
    except HttpConfigError as e:
        print(f"pagedserve serve: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _role_command() -> list[str]:
    """How `serve` starts a role: through the `pagedserve` console script when that is how
    we were started, so `ps` shows `pagedserve worker ...`; else `python -m launcher`."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) == "pagedserve" and os.path.isfile(script):
        return [sys.executable, os.path.abspath(script)]
    return [sys.executable, "-m", "launcher"]


if __name__ == "__main__":
    sys.exit(main())
