"""`pagedserve stats --server ADDR`: a running server's health and counters, readably.

    status         ok
    model          SmolLM2-135M-Instruct
    ...
    running        3
    kv_blocks      120 / 4096 used (2.9%)

Keys are those of `Client.health()` and `Client.stats()` (see docs/events.md,
`scheduler.stats`); `--json` prints both as one JSON object instead.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from launcher.client_io import check_address_or_exit, quiet_broken_pipe
from shared.client import Client, RequestError


def format_table(health: dict[str, Any], stats: dict[str, Any]) -> str:
    """Two columns, health first, then the counters in the server's order."""
    rows: list[tuple[str, str]] = [(k, _fmt(v)) for k, v in health.items() if k != "request_id"]
    stats = {k: v for k, v in stats.items() if k not in health}  # health's keys once (workers_ready)
    used, total = stats.pop("kv_blocks_used", None), stats.pop("kv_blocks_total", None)
    if used is not None and total:
        rows.append(("kv_blocks", f"{used} / {total} used ({100.0 * used / total:.1f}%)"))
    stats.pop("decode_phases", None)  # per-batch-size totals: for benchmarks (--json shows them)
    replicas = stats.pop("replicas", [])
    rows += [(k, _fmt(v)) for k, v in stats.items()]
    for i, r in enumerate(replicas if len(replicas) > 1 else []):  # data parallelism: one row each
        state = "draining" if r["draining"] else "routable" if r["routable"] else "down"
        text = (f"{r['addr']} {state}: waiting {r['waiting']}, running {r['running']}, free blocks "
                f"{r['free_blocks']}/{r['total_blocks']}, step {r['step_time_ms']:.4g} ms, hit rate "
                f"{r['prefix_cache_hit_rate']:.4g}, routed {json.dumps(r['routed'])}")
        rows.append((f"replica {i}", text))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def run_stats(args) -> int:
    check_address_or_exit("stats", args.server)
    with Client(args.server) as client:
        try:
            health = client.health(timeout=args.timeout)
            stats = client.stats(timeout=args.timeout)
        except RequestError as e:
            print(f"pagedserve stats: {e}", file=sys.stderr)
            return 1
    health.pop("request_id", None)
    try:
        if args.json:
            print(json.dumps({"health": health, "stats": stats}))
        else:
            print(format_table(health, stats))
        sys.stdout.flush()
    except BrokenPipeError:
        return quiet_broken_pipe()
    return 0
