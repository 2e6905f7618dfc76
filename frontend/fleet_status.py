"""What the frontend knows of its engine replicas together, with the interface of one replica's
`EngineStatus` (frontend/engine_status.py), which intake, health and metrics read.

Replicas serve the same model with the same settings (docs/data_parallel.md), so any ready
replica's EngineInfo gives the limits requests are validated against.
"""

from __future__ import annotations

import asyncio

from frontend.engine_status import limits_of
from shared import protocol as p
from shared.validation import Limits


class FleetStatus:
    """Reads the replicas' `EngineStatus`es; owns `became_ready` (set once any replica was ready)."""

    def __init__(self, replicas) -> None:
        self._replicas = replicas  # list[Replica] (frontend/replicas.py)
        self.became_ready = asyncio.Event()

    def refresh(self) -> None:
        """After any replica's EngineInfo."""
        if self.ever_ready:
            self.became_ready.set()

    @property
    def ready(self) -> bool:
        """Some replica takes requests now."""
        return any(r.routable for r in self._replicas)

    @property
    def ever_ready(self) -> bool:
        return any(r.status.ever_ready for r in self._replicas)

    @property
    def info(self) -> p.EngineInfo | None:
        """A ready replica's last ready EngineInfo (a routable one's first)."""
        ordered = sorted(self._replicas, key=lambda r: not r.routable)
        return next((r.status.info for r in ordered if r.status.info is not None), None)

    @property
    def latest(self) -> p.EngineInfo | None:
        """One EngineInfo for all: a routable replica's (else any), its worker counts summed."""
        infos = [r.status.latest for r in sorted(self._replicas, key=lambda r: not r.routable)
                 if r.status.latest is not None]
        if not infos:
            return None
        if len(self._replicas) == 1:
            return infos[0]
        return p.EngineInfo(**{**{f: getattr(infos[0], f) for f in infos[0].__struct_fields__},
                               "ready": self.ready, "workers_ready": sum(i.workers_ready for i in infos),
                               "workers_expected": sum(i.workers_expected for i in infos)})

    @property
    def refusal(self) -> str:
        """Why the replicas refuse this frontend, when none takes requests and one refuses."""
        if self.ready:
            return ""
        return next((r.status.refusal for r in self._replicas if r.status.refusal), "")

    def limits(self) -> Limits:
        assert self.info is not None, "limits before the server was ever ready"
        return limits_of(self.info)

    def health(self, draining: bool) -> str:
        """HealthReply.status: degraded while any replica is down or short of workers (one replica:
        its own `EngineStatus.health`)."""
        if len(self._replicas) == 1:
            return self._replicas[0].status.health(draining)
        if draining:
            return "draining"
        if not self.ever_ready:
            return "starting"
        return "ok" if all(r.healthy for r in self._replicas if not r.retired) else "degraded"
