"""`pagedserve bench serve --peers http,vllm,llamacpp`: the same sweep of rates, on the same
requests and arrival schedules, against pagedserve and then each peer's OpenAI server.

pagedserve is started with its HTTP API on as well (`--http-listen`): its ZeroMQ runs come first,
then (with `http`) the same rates through its HTTP API on the same server; it is stopped before
a peer's server starts (bench/peer_runs.py), so no two engines share the machine.

Results have the shape of `--variant` runs (bench/serve_variants.py), one entry per engine:
`{..., "engines": {NAME: {"server": {...}, "rates": {RATE: summary}}}, "unavailable": {...}}`,
the same side-by-side table, and the p99/p50 TPOT and p99 TTFT against rate plot (`TAG-tpot.png`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

from bench.launch import free_port
from bench.peer_runs import PEER_NAMES, http_peer
from bench.peer_setup import PeerUnavailable
from bench.serve_variants import report_sweep, sweep
from bench.targets import OpenAITarget, open_target


def run_engines(args, requests, server_flags: list[str], header: Callable, stem: str) -> dict:
    """pagedserve's sweep (ZeroMQ, then HTTP when asked), then every other peer's -> the result."""
    http = f"127.0.0.1:{free_port()}"
    engines: dict[str, dict] = {}
    unavailable: dict[str, str] = {}
    log_path = os.path.join(args.out, stem + ".server.log")
    with open_target(args, log_path, [*server_flags, "--http-listen", http]) as target:
        head = header(target)
        engines["pagedserve"] = {"server": {"flags": server_flags}, "rates": sweep(args, target, requests)}
        if "http" in args.peers:
            over_http = OpenAITarget(f"http://{http}", None)  # the model /v1/models names
            over_http.name = PEER_NAMES["http"]
            engines[PEER_NAMES["http"]] = {"server": {"flags": server_flags, "http": http},
                                           "rates": sweep(args, over_http, requests)}
    for name in (n for n in args.peers if n != "http"):
        try:
            with http_peer(name, args, requests) as peer:
                engines[PEER_NAMES[name]] = {"server": peer.peer, "rates": sweep(args, peer, requests)}
        except PeerUnavailable as exc:
            print(f"  {PEER_NAMES[name]} is unavailable: {exc}", file=sys.stderr)
            unavailable[PEER_NAMES[name]] = str(exc)
    return {**head, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "engines": engines,
            "unavailable": unavailable}


def p99_tpot_verdicts(engines: dict[str, dict], baseline: str = "pagedserve") -> dict[str, dict[str, bool]]:
    """Per peer and finite rate: is pagedserve's p99 TPOT no worse than the peer's? (the issue's
    target, judged only where the peer kept up: it completed every request of that rate)."""
    ours = engines[baseline]["rates"]
    verdicts: dict[str, dict[str, bool]] = {}
    for name, engine in engines.items():
        if name == baseline:
            continue
        verdicts[name] = {rate: ours[rate]["tpot_ms"]["p99"] <= run["tpot_ms"]["p99"]
                          for rate, run in engine["rates"].items()
                          if not math.isinf(float(rate)) and run["completed"] == run["num_requests"]}
    return verdicts


def serve_with_peers(args, requests, server_flags: list[str], header: Callable, stem: str) -> int:
    """Run, print, save; exit code 1 when pagedserve completed no request in some run."""
    result = run_engines(args, requests, server_flags, header, stem)
    result["p99_tpot_no_worse"] = p99_tpot_verdicts(result["engines"])
    report_sweep(args, stem, result, result["engines"],
                 tuple(f"{name}: UNAVAILABLE: {why.splitlines()[0]}" for name, why in result["unavailable"].items()))
    return int(any(run["completed"] == 0 for run in result["engines"]["pagedserve"]["rates"].values()))
