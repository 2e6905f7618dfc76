"""`pagedserve bench serve --variant NAME=FLAGS ...`: one sweep of rates against differently
configured servers, in one run, on the same requests and arrival schedules.

One server per variant, started with the bench's server flags plus the variant's FLAGS (split
as a shell would), runs every `--request-rate` in turn; then it is stopped and the next variant's
starts, so no two servers share the machine. Made to compare the scheduler's batching policies
(docs/benchmarks.md, "Tail latency"):

    pagedserve bench serve --dtype bfloat16 --request-rate 1 1.5 2 inf --goodput ttft:5000 tpot:100 \\
        --variant "before=--batching-policy fcfs" --variant "after=--target-tpot-ms 60"

Results: `{..., "variants": {NAME: {"server_args": [...], "rates": {RATE: summary}}}}` in
`--out/TAG.json`, a table per rate with the variants side by side, and (matplotlib) p99 and p50
TPOT and p99 TTFT against the rate, one line per variant (`TAG-tpot.png`; the burst, rate inf,
is the last point).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from collections.abc import Callable

from bench import report
from bench.goodput import slos_ms
from bench.targets import open_target


def variant_item(text: str) -> tuple[str, list[str]]:
    """argparse type of one `NAME=FLAGS` -> (name, flags)."""
    name, sep, flags = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FLAGS, NAME of letters, digits, . _ -")
    return name, shlex.split(flags)


def check_variant_flags(parser: argparse.ArgumentParser, args) -> None:
    if not getattr(args, "variant", None):
        return
    if args.backend != "zmq" or args.server:
        parser.error("--variant starts a server per variant: not with --server or --backend openai")
    names = [name for name, _ in args.variant]
    if len(set(names)) != len(names):
        parser.error(f"--variant names must differ, got {names}")


def run_variants(args, requests, server_flags: list[str], header: Callable, stem: str) -> dict:
    """Every variant's sweep -> the result (records are left out: the JSON keeps summaries)."""
    variants: dict[str, dict] = {}
    head: dict = {}
    for name, flags in args.variant:
        log_path = os.path.join(args.out, f"{stem}-{name}.server.log")
        print(f"variant {name}: {' '.join(flags) or '(defaults)'}", file=sys.stderr)
        with open_target(args, log_path, [*server_flags, *flags]) as target:
            head = head or header(target)
            rates = sweep(args, target, requests)
        variants[name] = {"server_args": flags, "rates": rates}
    return {**head, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "variants": variants}


def sweep(args, target, requests) -> dict[str, dict]:
    """Every --request-rate against `target` -> {rate: summary with per_request_ms, no records}."""
    rates = {}
    for rate in args.request_rate:
        run = target.run(requests, rate, slos_ms(args.goodput), burstiness=args.burstiness,
                         max_concurrency=args.max_concurrency, seed=args.seed)
        run["per_request_ms"] = per_request_ms(run.pop("_records"))
        rates[f"{rate:g}"] = run
    return rates


def per_request_ms(records) -> list[list[float | None]]:
    """[TTFT, TPOT] (ms; TPOT None for one-token outputs) of each completed request, so goodput at
    any other SLO can be computed from the JSON later (`goodput_at`)."""
    return [[round(r.ttft_s * 1000, 2), None if (t := r.tpot_s()) is None else round(t * 1000, 3)]
            for r in records if r.ok]


def goodput_at(run: dict, ttft_ms: float, tpot_ms: float) -> float:
    """Requests/s of a saved run that met TTFT <= ttft_ms and TPOT <= tpot_ms (None TPOT meets any)."""
    good = sum(ttft <= ttft_ms and (tpot is None or tpot <= tpot_ms) for ttft, tpot in run["per_request_ms"])
    return round(good / run["duration_s"], 4)


def variants_table(variants: dict[str, dict]) -> str:
    """Per rate, one row per variant: throughput, TTFT, TPOT and ITL p50/p99 (ms), goodput."""
    runs = [run for v in variants.values() for run in v["rates"].values()]
    goodput = any("goodput" in run for run in runs)
    rows = [f"{'rate':>6} {'engine':<16}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
            f"{'TPOT p99':>10}{'p99/p50':>8}{'ITL p50':>9}{'ITL p99':>9}{'over tgt':>9}"
            + (f"{'good req/s':>11}" if goodput else "") + "   (ms)"]
    rates = list(next(iter(variants.values()))["rates"])
    for rate in rates:
        for name, variant in variants.items():
            s = variant["rates"][rate]
            tpot = s["tpot_ms"]
            ratio = tpot["p99"] / tpot["median"] if tpot["median"] else 0.0
            over = f"{s['steps_over_target']}/{s['steps']}" if s.get("steps") else "-"
            rows.append(f"{rate:>6} {name:<16}{s['output_tokens_per_s']:>10.1f}{s['ttft_ms']['median']:>10.0f}"
                        f"{s['ttft_ms']['p99']:>10.0f}{tpot['median']:>10.1f}{tpot['p99']:>10.1f}{ratio:>8.2f}"
                        f"{s['itl_ms']['median']:>9.1f}{s['itl_ms']['p99']:>9.0f}{over:>9}"
                        + (f"{s['goodput']['requests_per_s']:>11.3f}" if "goodput" in s else ""))
    return "\n".join(rows)


def plot_variants(path: str, result: dict) -> str | None:
    """p99 and p50 TPOT and p99 TTFT against the rate, one colour per variant; None without matplotlib."""
    from bench.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    fig, (tpot, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    labels: list[str] = []
    for name, variant in result["variants"].items():
        rates = list(variant["rates"])
        labels = [("burst" if math.isinf(float(r)) else r) for r in rates]
        xs = list(range(len(rates)))
        runs = [variant["rates"][r] for r in rates]
        line, = tpot.plot(xs, [s["tpot_ms"]["p99"] for s in runs], marker="o", label=f"{name} p99")
        tpot.plot(xs, [s["tpot_ms"]["median"] for s in runs], marker=".", linestyle="--", color=line.get_color(),
                  label=f"{name} p50")
        ttft.plot(xs, [s["ttft_ms"]["p99"] / 1000 for s in runs], marker="o", label=name)
    for ax, what in ((tpot, "TPOT (ms)"), (ttft, "p99 TTFT (s)")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['num_prompts']} {result['source']} requests, {result['model']} {result.get('dtype', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serve_variants(args, requests, server_flags: list[str], header: Callable, stem: str) -> int:
    """Run, print, save; exit code 1 when some run completed no request."""
    result = run_variants(args, requests, server_flags, header, stem)
    runs = report_sweep(args, stem, result, result["variants"])
    return int(any(run["completed"] == 0 for run in runs.values()))


def report_sweep(args, stem: str, result: dict, variants: dict[str, dict], notes: tuple[str, ...] = ()) -> dict:
    """Print `variants`' table, the SLO, `notes` and the failures; write `result` as JSON and the
    TPOT plot. Returns every run by "NAME at RATE req/s" (for the caller's exit code)."""
    print(variants_table(variants))
    if args.goodput:
        print(report.slo_line(slos_ms(args.goodput)))
    for note in notes:
        print(note)
    runs = {f"{name} at {rate} req/s": run for name, v in variants.items() for rate, run in v["rates"].items()}
    for line in report.failure_lines(runs):
        print(line, file=sys.stderr)
    path = os.path.join(args.out, stem + ".json")
    report.write_json(path, result)
    print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    if not args.no_plots:
        written = plot_variants(os.path.join(args.out, stem + "-tpot.png"), {**result, "variants": variants})
        if written:
            print(f"wrote {os.path.relpath(written)}", file=sys.stderr)
    return runs
