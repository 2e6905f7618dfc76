"""What the frontend knows of the scheduler answering it: the `EngineInfo` of its last ping reply."""

from __future__ import annotations

import asyncio

from shared import protocol as p
from shared.logging import get_logger
from shared.validation import Limits

log = get_logger()


class EngineStatus:
    """The last `EngineInfo`s, and whether the server was ever ready.

    `info` (the last ready EngineInfo: the model's facts and the scheduler's limits) is kept
    while a restarted scheduler starts, so requests are still validated and held meanwhile.
    A scheduler that refuses this frontend (`EngineInfo.refusal`: another protocol version)
    leaves it unready, whatever else the EngineInfo says."""

    def __init__(self, listen: str) -> None:
        self._listen = listen  # for `server.ready`
        self.latest: p.EngineInfo | None = None  # the last EngineInfo of all
        self.info: p.EngineInfo | None = None  # the last ready one
        self.ever_ready = False
        self.became_ready = asyncio.Event()  # set when `server.ready` is logged
        self._refusals_logged: set[str] = set()

    @property
    def ready(self) -> bool:
        """The scheduler now answering has its workers and accepts us: requests go to it at once."""
        return self.latest is not None and self.latest.ready and not self.latest.refusal

    @property
    def refusal(self) -> str:
        """Why the scheduler now answering refuses this frontend; "" when it does not."""
        return self.latest.refusal if self.latest is not None else ""

    def update(self, msg: p.EngineInfo) -> None:
        self.latest = msg
        if msg.refusal:
            if msg.refusal not in self._refusals_logged:  # it answers every ping: log each reason once
                self._refusals_logged.add(msg.refusal)
                log.error("frontend.refused_by_scheduler", reason=msg.refusal, scheduler_id=msg.scheduler_id,
                          protocol_version=p.PROTOCOL_VERSION)
            return
        if not msg.ready:
            return
        self.info = msg
        if not self.ever_ready:
            self.ever_ready = True
            log.info("server.ready", listen=self._listen, model=msg.model, max_model_len=msg.max_model_len,
                     kv_blocks=msg.num_device_blocks, block_size=msg.block_size, kv_cache_bytes=msg.kv_cache_bytes)
            self.became_ready.set()

    def limits(self) -> Limits:
        """The limits any one request must fit, from the last ready EngineInfo."""
        assert self.info is not None, "limits before the server was ever ready"
        return limits_of(self.info)

    def health(self, draining: bool) -> str:
        """HealthReply.status. degraded: the workers are recovering from a failure (or the
        scheduler refuses us); requests wait meanwhile."""
        if draining:
            return "draining"
        if not self.ever_ready:
            return "starting"
        info = self.latest or p.EngineInfo(ready=False)
        return "degraded" if not self.ready or info.workers_ready < info.workers_expected else "ok"


def limits_of(info: p.EngineInfo) -> Limits:
    """The limits any one request must fit (shared/validation.py) on the engine `info` describes.
    A scheduler older than max_num_batched_tokens in EngineInfo sends 0: then the step budget
    is taken as max_model_len, so the check it feeds passes no more than the model allows."""
    return Limits(max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                  num_device_blocks=info.num_device_blocks, block_size=info.block_size,
                  max_num_batched_tokens=info.max_num_batched_tokens or info.max_model_len,
                  enable_chunked_prefill=info.enable_chunked_prefill)
