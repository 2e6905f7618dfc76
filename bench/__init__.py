"""Benchmarks: `pagedserve bench throughput|serve` (bench/cli.py), peers in the same run,
KV utilization (bench/kv_utilization.py) and kernel speed (bench/kernels.py)."""
