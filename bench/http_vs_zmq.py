"""`pagedserve bench http-vs-zmq`: one server, the same requests through the SDK (ZeroMQ) and
through the OpenAI-compatible HTTP API, in one run; throughput and the frontend's CPU per token.

    pagedserve bench http-vs-zmq [--num-prompts 128] [--max-output-len 128] [--max-concurrency 64]
                                 [--order zmq openai] [--dtype float32]

One `pagedserve serve --http-listen 127.0.0.1:PORT` is started (bench/launch.py). Both paths
are warmed up first (a few short requests each), then each path runs every request at rate inf
with at most --max-concurrency in flight, in --order. Around each measured run the SDK asks the
server for its stats: the frontend's own CPU seconds (`frontend_cpu_s`, time.process_time() of
the frontend process, all threads) and the scheduler's `tokens_generated`, whose deltas give the
frontend CPU per output token. The bench client's own CPU per token and, on Linux, the CPU of
all of the server's processes are reported beside it. Neither path polls stats during its run.
Result: a table, and JSON (plus a latency CDF plot) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time

from bench import plots, report
from bench.arrivals import dispatch
from bench.cli import RESULTS_DIR, _requests, _server_flags
from bench.driver import _one as zmq_one
from bench.launch import BenchServer, free_port
from bench.metrics import summarize
from bench.progress import ProgressBar
from bench.targets import OpenAITarget, WarmUpFailed, ZmqTarget
from shared.client import AsyncClient, Client

TARGET_RATIO = 0.95  # the check: HTTP throughput at least 95% of the SDK's


class QuietZmqTarget(ZmqTarget):
    """The SDK path without bench/driver.py's stats poller, so that neither path adds frontend
    work the other does not (the HTTP driver polls nothing)."""

    def _drive(self, requests, *, rate=math.inf, max_concurrency=None, progress=lambda n: None, **kwargs):
        async def drive():
            async with AsyncClient(self.where, timeout=None) as client:
                return await dispatch(requests, lambda r, rec, t0: zmq_one(client, r, rec, t0), rate=rate,
                                      max_concurrency=max_concurrency, progress=progress)

        records, duration = asyncio.run(drive())
        return records, duration, {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve bench http-vs-zmq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", choices=("auto", "sharegpt", "synthetic"), default="auto")
    parser.add_argument("--max-output-len", type=int, default=128, help="cap each request's output (tokens)")
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--order", nargs=2, choices=("zmq", "openai"), default=["zmq", "openai"],
                        help="which path runs first (default: zmq openai)")
    parser.add_argument("--warmup-prompts", type=int, default=8, help="short requests per path before measuring")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="extra flag for the server, e.g. --server-arg=--max-num-seqs=128")
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--tag", default=None, help="file name stem (default: http-vs-zmq-DEVICE)")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def _server_cpu_s(root: int) -> float | None:
    """User + system CPU seconds of the live process `root` and its descendants (Linux /proc):
    the supervisor and its roles, each of which runs in a process group of its own."""
    if not os.path.isdir("/proc"):
        return None
    procs = {}  # pid -> (ppid, ticks)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # [0] state, [1] ppid, [11] utime, [12] stime
        except OSError:
            continue
        procs[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        tree, grew = tree | more, bool(more)
    return sum(procs[pid][1] for pid in tree if pid in procs) / os.sysconf("SC_CLK_TCK")


def _counters(address: str, root: int) -> dict:
    with Client(address) as client:
        stats = client.stats()
    if "frontend_cpu_s" not in stats:
        raise SystemExit("the server's stats have no frontend_cpu_s: a pagedserve older than this bench")
    return {"frontend_cpu_s": stats["frontend_cpu_s"], "tokens_generated": stats.get("tokens_generated", 0),
            "server_cpu_s": _server_cpu_s(root), "client_cpu_s": time.process_time()}


def _warm_up(target, requests, n: int) -> None:
    short = [type(r)(r.prompt_ids[:32], min(r.output_len, 8)) for r in requests[:max(1, n)]]
    records, _, _ = target._drive(short, max_concurrency=len(short))
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise WarmUpFailed(f"warm-up through {target.where} failed: {failed[0]}")


def _measure(target, requests, args, address: str, root: int) -> dict:
    before = _counters(address, root)
    records, duration, _ = target._drive(requests, rate=math.inf, max_concurrency=args.max_concurrency,
                                         progress=ProgressBar(target.name, len(requests)))
    after = _counters(address, root)
    delta = {k: (after[k] - before[k]) if after[k] is not None else None for k in after}
    summary = summarize(records, duration)
    tokens = delta["tokens_generated"] or summary["output_tokens"] or 1
    per_token = {f"{k[:-2]}_ms_per_token": round(1000 * v / tokens, 4) for k, v in delta.items()
                 if k.endswith("_cpu_s") and v is not None}
    return {**summary, "backend": target.backend, "tokens_generated": delta["tokens_generated"],
            **{k: round(v, 3) for k, v in delta.items() if k.endswith("_cpu_s") and v is not None},
            **per_token, "_records": records}


def _ratios(zmq: dict, http: dict) -> dict:
    def ratio(key):
        return round(http[key] / zmq[key], 4) if zmq.get(key) and http.get(key) is not None else None

    out = {"output_tokens_per_s": ratio("output_tokens_per_s"),
           "frontend_cpu_ms_per_token": ratio("frontend_cpu_ms_per_token"),
           "server_cpu_ms_per_token": ratio("server_cpu_ms_per_token"),
           "client_cpu_ms_per_token": ratio("client_cpu_ms_per_token")}
    out["throughput_target"] = TARGET_RATIO
    out["throughput_within_target"] = (out["output_tokens_per_s"] or 0.0) >= TARGET_RATIO
    return out


def table(paths: dict[str, dict], ratios: dict) -> str:
    def cpu(s, key):
        return f"{s[key]:>10.3f}" if key in s else f"{'-':>10}"

    rows = [(f"{'path':<8}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
             f"{'frontend':>10}{'server':>10}{'client':>10}{'failed':>8}"),
            f"{'':<8}{'':>10}{'ms':>10}{'ms':>10}{'ms':>10}{'ms':>10}{'CPU ms/tok':>30}"]
    for name, s in paths.items():
        rows.append(f"{name:<8}{s['output_tokens_per_s']:>10.1f}{s['ttft_ms']['median']:>10.0f}"
                    f"{s['ttft_ms']['p99']:>10.0f}{s['tpot_ms']['median']:>10.1f}{s['tpot_ms']['p99']:>10.1f}"
                    f"{cpu(s, 'frontend_cpu_ms_per_token')}{cpu(s, 'server_cpu_ms_per_token')}"
                    f"{cpu(s, 'client_cpu_ms_per_token')}{s['failed']:>8}")
    tput = ratios["output_tokens_per_s"]
    verdict = "within" if ratios["throughput_within_target"] else "NOT within"
    rows.append(f"openai / zmq: throughput {tput if tput is None else f'{tput:.3f}'} ({verdict} the "
                f"{TARGET_RATIO:.2f} target), frontend CPU per token {ratios['frontend_cpu_ms_per_token']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(set(args.order)) != 2:
        raise SystemExit("--order names both paths once: zmq openai, or openai zmq")
    # What bench/cli.py's helpers read: this bench always serves the model itself.
    args.backend, args.random_weights, args.tokenizer, args.vocab_size = "zmq", None, None, 49152
    started = time.perf_counter()
    source, requests = _requests(args)
    stem = args.tag or f"http-vs-zmq-{args.device.replace(':', '')}"
    os.makedirs(args.out, exist_ok=True)
    http_listen = f"127.0.0.1:{free_port()}"
    flags = [*_server_flags(args), "--http-listen", http_listen]
    log_path = os.path.join(args.out, stem + ".server.log")
    print(f"starting the server (log: {log_path})", file=sys.stderr)
    with BenchServer(flags, log_path) as server:
        targets = {"zmq": QuietZmqTarget(server.address, started_here=True),
                   "openai": OpenAITarget(f"http://{http_listen}", None)}
        for name in args.order:
            _warm_up(targets[name], requests, args.warmup_prompts)
        runs = {name: _measure(targets[name], requests, args, server.address, server.proc.pid) for name in args.order}
        server_models = targets["openai"].server_models
    records = {name: run.pop("_records") for name, run in runs.items()}
    paths = {name: runs[name] for name in ("zmq", "openai")}
    ratios = _ratios(paths["zmq"], paths["openai"])
    result = {"mode": "http-vs-zmq", "source": source, "num_prompts": len(requests), "seed": args.seed,
              "model": args.model, "dtype": args.dtype, "max_output_len": args.max_output_len,
              "max_concurrency": args.max_concurrency, "request_rate": "inf", "order": args.order,
              "warmup_prompts": args.warmup_prompts, "server_flags": flags, "server_models": server_models,
              "environment": report.environment(args.device), "paths": paths, "ratios": ratios}
    print(table(paths, ratios))
    for line in report.failure_lines(paths):
        print(line, file=sys.stderr)
    path = os.path.join(args.out, stem + ".json")
    report.write_json(path, result)
    print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    if not args.no_plots:
        series = {f"{name} ({'SDK' if name == 'zmq' else 'HTTP'})": records[name] for name in args.order}
        for written in plots.write_plots("throughput", os.path.join(args.out, stem), result, series):
            print(f"wrote {os.path.relpath(written)}", file=sys.stderr)
    print(f"bench done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return int(any(run["completed"] == 0 for run in paths.values()))


if __name__ == "__main__":
    sys.exit(main())
