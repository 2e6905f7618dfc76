"""The frontend's `stats` over several engine replicas (docs/data_parallel.md): one dict in the
shape a single scheduler's stats have, so readers of one replica's figures read the fleet's."""

from __future__ import annotations

# Figures that do not add up over replicas: the slowest replica's is reported.
_WORST = ("step_time_p50_s", "step_time_p99_s", "kv_blocks_used_peak")


def merged_stats(per_replica: dict[int, dict], figures: list[dict]) -> dict:
    """`per_replica`: index -> that scheduler's stats (those that answered); `figures`: every
    replica's `Replica.figures()` (load, routing decisions by cause, hit rate), under "replicas".

    With one replica its stats are returned as they are. Otherwise numbers are summed (counters,
    gauges, token rates), but `_WORST` (the largest) and the hit rate (hit / queried tokens of the
    sums); booleans are true if any replica's is; other values are the first replica's."""
    routed: dict[str, int] = {}
    for f in figures:
        for cause, n in f["routed"].items():
            routed[cause] = routed.get(cause, 0) + n
    extra = {"replicas": figures, "routed": routed, "replicas_routable": sum(f["routable"] for f in figures)}
    if len(per_replica) == 1 and len(figures) == 1:
        return {**next(iter(per_replica.values())), **extra}
    out: dict = {}
    for stats in per_replica.values():
        for key, value in stats.items():
            if key not in out:
                out[key] = value
            elif isinstance(value, bool):
                out[key] = out[key] or value
            elif isinstance(value, int | float) and isinstance(out[key], int | float):
                out[key] = max(out[key], value) if key in _WORST else out[key] + value
    hits, queried = out.get("prefix_cache_hit_tokens"), out.get("prefix_cache_queried_tokens")
    if hits is not None and queried is not None:
        out["prefix_cache_hit_rate"] = round(hits / queried, 4) if queried else 0.0
    return {**out, **extra}
