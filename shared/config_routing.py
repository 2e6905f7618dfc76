"""The routing section: which engine replicas a frontend sends requests to, and how it picks one.

An engine replica is one scheduler and its worker group (docs/data_parallel.md). A frontend
connects to every address in `engines` (default: the one scheduler of `endpoints`) and routes
each request by the routing policy (frontend/router.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.config_base import _help, _Section

RoutingPolicy = Literal["prefix", "round_robin", "least_loaded"]


class RoutingConfig(_Section):
    """Data parallelism: the engine replicas a frontend routes requests to (docs/data_parallel.md)."""

    engines: Annotated[list[str], _help("frontend: the replicas' scheduler endpoints, comma-separated (TOML: a "
                                        "list); empty: the one scheduler of --scheduler-frontend-addr "
                                        "(serve --data-parallel-size fills it)", "ADDR,ADDR,...")] = msgspec.field(default_factory=list)
    routing_policy: Annotated[RoutingPolicy, _help(
        "prefix: the replica holding the longest cached prefix of the prompt, unless its load exceeds the "
        "least loaded one's by --routing-load-margin; round_robin; least_loaded")] = "prefix"
    routing_load_margin: Annotated[int, _help("prefix routing: requests (waiting + running) a replica may carry "
                                              "beyond the least loaded one and still get work for its cache",
                                              "REQUESTS")] = 8
    replica_silence_s: Annotated[float, _help("a replica whose scheduler sends nothing this long (it reports "
                                              "every 0.1 s) is taken as dead: its requests move to the others",
                                              "SECONDS")] = 3.0
    # CURVE between frontends and schedulers across hosts (shared/curve.py; keys from `pagedserve keygen`).
    engine_curve_secret_key_file: Annotated[str, _help(
        "CURVE on the scheduler's frontend endpoint: this process's .key_secret (the scheduler's own, or the "
        "frontend's); the scheduler also needs --engine-curve-frontends-dir, the frontend "
        "--engine-curve-server-key-file", "FILE")] = ""
    engine_curve_frontends_dir: Annotated[str, _help("scheduler: directory of the public .key files of the "
                                                     "frontends allowed to connect", "DIR")] = ""
    engine_curve_server_key_file: Annotated[str, _help("frontend: the schedulers' public .key file (every "
                                                       "replica uses the same key pair)", "FILE")] = ""

    def validate(self) -> None:
        for addr in self.engines:
            if not addr.startswith(("ipc://", "tcp://")):
                raise ValueError(f"engines: each address must be ipc://PATH or tcp://HOST:PORT, got {addr!r}")
        if len(set(self.engines)) != len(self.engines):
            raise ValueError(f"engines: an address is listed twice: {self.engines}")
        if self.routing_load_margin < 0:
            raise ValueError(f"routing_load_margin must be >= 0, got {self.routing_load_margin}")
        if not self.replica_silence_s > 0:
            raise ValueError(f"replica_silence_s must be > 0, got {self.replica_silence_s}")
        if (self.engine_curve_frontends_dir or self.engine_curve_server_key_file) and \
                not self.engine_curve_secret_key_file:
            raise ValueError("engine_curve_frontends_dir and engine_curve_server_key_file need "
                             "engine_curve_secret_key_file (this process's own key pair)")

    def engine_curve_keys(self):
        """The frontend's CURVE keys for its DEALERs to the schedulers (`shared/curve.CurveKeys`),
        or None without `engine_curve_server_key_file`."""
        if not self.engine_curve_server_key_file:
            return None
        from shared.curve import CurveKeys

        return CurveKeys.load(self.engine_curve_secret_key_file, self.engine_curve_server_key_file)

    def resolved_engines(self, default: str) -> list[str]:
        """The scheduler endpoints the frontend connects to: `engines`, else [`default`]."""
        return list(self.engines) or [default]
