"""Per-replica Prometheus families for data parallelism (docs/data_parallel.md, docs/metrics.md).

The fleet-wide families in frontend/metrics.py sum the replicas; these say which replica holds
the load, the cache hits and the routing decisions, labelled `replica` (its index in the
frontend's list) and `addr` (its scheduler's endpoint). Built on each scrape from the
`replicas` list of `Replicas.stats()` (each entry is `Replica.figures()`); a single engine has
that list too, with one entry, so dashboards need no second layout.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

LABELS = ["model_name", "replica", "addr"]
ROUTING_CAUSES = ("prefix", "load", "affinity", "failover")


def replica_families(prefix: str, model_name: str, figures: list[dict]) -> Iterator[Metric]:
    """Metric families over `figures` (one dict per replica); nothing when the list is empty."""
    if not figures:
        return
    gauges = {
        "replica_routable": ("1 while the replica takes new requests (up, ready, not draining), else 0",
                             lambda f: 1.0 if f["routable"] else 0.0),
        "replica_num_requests_waiting": ("Sequences waiting at the replica's last load report",
                                         lambda f: f["waiting"]),
        "replica_num_requests_running": ("Sequences running at the replica's last load report",
                                         lambda f: f["running"]),
        "replica_kv_cache_usage_perc": ("The replica's KV-cache usage: blocks in use over all blocks (1 = full)",
                                        lambda f: 1.0 - f["free_blocks"] / f["total_blocks"] if f["total_blocks"]
                                        else 0.0),
        "replica_step_time_seconds": ("The replica's recent step time, from its load report",
                                      lambda f: f["step_time_ms"] / 1000.0),
    }
    for name, (doc, value_of) in gauges.items():
        family = GaugeMetricFamily(prefix + name, doc, labels=LABELS)
        for f in figures:
            family.add_metric(_labels(model_name, f), value_of(f))
        yield family
    # The scheduler's totals since its start: a restarted replica starts them again (a counter reset).
    for name, key, doc in (("replica_prefix_cache_queries", "prefix_cache_queried_tokens",
                            "The replica's prefix-cache queries, in tokens"),
                           ("replica_prefix_cache_hits", "prefix_cache_hit_tokens",
                            "The replica's prefix-cache hits, in tokens")):
        family = CounterMetricFamily(prefix + name, doc, labels=LABELS)
        for f in figures:
            family.add_metric(_labels(model_name, f), f[key])
        yield family
    routed = CounterMetricFamily(prefix + "replica_routed_requests", "Requests this frontend sent to the "
                                 "replica, by the routing decision's cause", labels=LABELS + ["cause"])
    for f in figures:
        for cause in sorted(set(ROUTING_CAUSES) | set(f["routed"])):
            routed.add_metric(_labels(model_name, f) + [cause], f["routed"].get(cause, 0))
    yield routed


def _labels(model_name: str, figures: dict) -> list[str]:
    return [model_name, str(figures.get("index", "")), figures["addr"]]
