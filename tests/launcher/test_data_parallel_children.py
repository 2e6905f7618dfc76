"""`serve --data-parallel-size N`: each replica's children and devices (launcher/supervisor.py)."""

from __future__ import annotations

from launcher.supervisor import _replica_names, _worker_flags
from shared.config import ServerConfig


def test_one_replica_keeps_the_old_names_several_are_numbered():
    one = ServerConfig.from_settings(tensor_parallel_size=2)
    assert _replica_names(one, 0) == ("scheduler", ["worker0", "worker1"])
    two = ServerConfig.from_settings(tensor_parallel_size=2, data_parallel_size=2)
    assert _replica_names(two, 1) == ("scheduler-1", ["worker0-1", "worker1-1"])


def test_each_replicas_ranks_get_their_own_gpus():
    config = ServerConfig.from_settings(tensor_parallel_size=2, data_parallel_size=2, device="cuda")
    flags = _worker_flags(["--device", "cuda"], config, rank=1, replica=1)
    assert flags[-2:] == ["--device", "cuda:3"] and flags.count("--device") == 1
    cpu = ServerConfig.from_settings(data_parallel_size=2)
    assert _worker_flags(["--device", "cpu"], cpu, rank=0, replica=1) == ["--device", "cpu", "--rank", "0"]
