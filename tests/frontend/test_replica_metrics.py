"""Per-replica Prometheus families (frontend/metrics_replicas.py) from real `Replica.figures()`
merged as `ReplicaSet.stats()` merges them: load, KV usage, cache hits and routing by cause,
each labelled with the replica's index and address."""

from __future__ import annotations

from types import SimpleNamespace

from metrics_fakes import MODEL, fake_stats, render, value
from prometheus_client.parser import text_string_to_metric_families

from frontend.metrics import FrontendMetrics
from frontend.replica import Replica
from frontend.replica_stats import merged_stats
from shared import protocol as p


def _replica(index: int, load: p.KvEvents, routed: dict[str, int], draining: bool = False) -> Replica:
    replica = Replica(index, f"ipc:///run/r{index}", client=None, status=SimpleNamespace(ready=True, latest=None),
                      resubmitter=None)
    replica.load = load
    replica.routed.update(routed)
    return replica


def test_each_replica_gets_its_own_labelled_figures():
    busy = _replica(0, p.KvEvents(scheduler_id="a", seq=3, waiting=4, running=8, free_blocks=25, total_blocks=100,
                                  step_time_ms=40.0, prefix_hit_tokens=300, prefix_queried_tokens=400),
                    {"prefix": 5, "affinity": 2})
    idle = _replica(1, p.KvEvents(scheduler_id="b", seq=9, free_blocks=100, total_blocks=100, draining=True),
                    {"load": 1, "failover": 3})
    stats = merged_stats({0: {"running": 8}, 1: {"running": 0}}, [busy.figures(), idle.figures()])
    text = render(FrontendMetrics(MODEL, fake_stats(stats)))
    first, second = {"replica": "0", "addr": "ipc:///run/r0"}, {"replica": "1", "addr": "ipc:///run/r1"}
    assert value(text, "pagedserve:replica_num_requests_waiting", **first) == 4
    assert value(text, "pagedserve:replica_num_requests_running", **first) == 8
    assert value(text, "pagedserve:replica_kv_cache_usage_perc", **first) == 0.75
    assert value(text, "pagedserve:replica_kv_cache_usage_perc", **second) == 0.0
    assert value(text, "pagedserve:replica_step_time_seconds", **first) == 0.04
    assert value(text, "pagedserve:replica_prefix_cache_hits_total", **first) == 300
    assert value(text, "pagedserve:replica_prefix_cache_queries_total", **first) == 400
    assert value(text, "pagedserve:replica_routable", **first) == 1
    assert value(text, "pagedserve:replica_routable", **second) == 0  # draining
    assert value(text, "pagedserve:replica_routed_requests_total", cause="affinity", **first) == 2
    assert value(text, "pagedserve:replica_routed_requests_total", cause="load", **first) == 0
    assert value(text, "pagedserve:replica_routed_requests_total", cause="failover", **second) == 3
    assert value(text, "pagedserve:num_requests_running") == 8  # the fleet's sum is still there
    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert kinds["pagedserve:replica_routed_requests"] == kinds["pagedserve:replica_prefix_cache_hits"] == "counter"


def test_no_replica_list_means_no_replica_families():
    text = render(FrontendMetrics(MODEL, fake_stats({"running": 1})))
    assert "replica_" not in text
