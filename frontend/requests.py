"""The requests in flight in this frontend, and the table that finds them.

A request has two names: the client's request id (unique per frontend while in flight) and
the engine id the scheduler knows it by: the request id, or after a scheduler restart
`<request id>#<attempt>` (frontend/resubmit.py). Deltas arrive under the engine id; clients
speak of the request id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from frontend.detokenizer import OutputText
from shared import protocol as p


@dataclass
class FrontendRequest:
    """One in-flight request. Times are `time.monotonic()` seconds, but `arrival_wall` (epoch).

    Holds the prompt ids and, in `outputs`, the tokens generated so far: all a restarted
    scheduler needs to continue it. `held`: waiting for a ready scheduler, which the
    scheduler does not know of (nothing to abort there). `finish[i]`: output i's finish
    reason, None while it runs."""

    request_id: str
    client: bytes
    stream: bool
    prompt_ids: list[int]
    params: p.SamplingParams
    outputs: list[OutputText]
    arrival: float
    finish: list[str | None] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: dict[int, float] = field(default_factory=dict)  # output index -> its latest token's time
    num_preemptions: int = 0
    logprobs: list[list[p.TokenLogprobs]] | None = None  # per output, when params.logprobs is set
    prompt_logprobs: list[p.TokenLogprobs] = field(default_factory=list)  # prompt tokens 1..
    engine_id: str = ""
    priority: int = 0
    arrival_wall: float = 0.0
    held: bool = False
    attempt: int = 0
    replica: int = -1  # the engine replica it was last sent to (frontend/replicas.py); -1: none yet
    aborting: bool = False  # its client aborted it: an "abort" finish is the answer, not a replica's drain
    traceparent: str = ""  # the client's W3C traceparent, checked (frontend/metrics_trace.py); "" = none
    # Beam search: output index -> (cumulative logprob, score), and the scheduler's KV figures
    # for `request.finished` (TokenDelta.beam_stats).
    beam_scores: dict[int, tuple[float, float]] = field(default_factory=dict)
    beam_stats: dict[str, int] = field(default_factory=dict)
    # Speculative decoding: output index -> (proposed, accepted), the latest totals its deltas carried.
    spec: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def spec_fields(self) -> dict[str, int]:
        """`request.finished`'s `spec_proposed` and `spec_accepted` (sums over its outputs); none when
        nothing was proposed (speculation off, or never eligible)."""
        if not self.spec:
            return {}
        return {"spec_proposed": sum(p for p, _ in self.spec.values()),
                "spec_accepted": sum(a for _, a in self.spec.values())}

    def finish_unfinished(self, reason: str) -> None:
        """End every output still running with `reason` (an abort, decided here)."""
        self.finish = [f if f is not None else reason for f in self.finish]


class RequestTable:
    """Every request in flight, by request id and by engine id, and how many each client has.

    Invariants: a request is in both maps or in neither; `per_client[c]` is the number of
    requests of client c in the table and is never 0 (a client without requests has no entry),
    so its length is the number of clients with requests in flight."""

    def __init__(self) -> None:
        self._by_request: dict[str, FrontendRequest] = {}
        self._by_engine: dict[str, FrontendRequest] = {}
        self._per_client: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._by_request)

    def __iter__(self) -> Iterator[FrontendRequest]:
        """In arrival order. Iterate over a copy (`list(table)`) when forgetting on the way."""
        return iter(self._by_request.values())

    def __contains__(self, req: FrontendRequest) -> bool:
        return self._by_request.get(req.request_id) is req

    def add(self, req: FrontendRequest) -> None:
        """Track `req` under its request id and engine id; both must be free (`id_in_use`)."""
        self._by_request[req.request_id] = self._by_engine[req.engine_id] = req
        self._per_client[req.client] = self._per_client.get(req.client, 0) + 1

    def forget(self, req: FrontendRequest) -> bool:
        """Drop `req`; False if it was gone already."""
        self._by_engine.pop(req.engine_id, None)
        if self._by_request.pop(req.request_id, None) is None:
            return False
        left = self._per_client.pop(req.client) - 1
        if left:
            self._per_client[req.client] = left
        return True

    def get(self, request_id: str) -> FrontendRequest | None:
        return self._by_request.get(request_id)

    def by_engine_id(self, engine_id: str) -> FrontendRequest | None:
        return self._by_engine.get(engine_id)

    def id_in_use(self, request_id: str) -> bool:
        """A new request may not take an id in use as a request id or an engine id."""
        return request_id in self._by_request or request_id in self._by_engine

    def rename(self, req: FrontendRequest, engine_id: str) -> None:
        """Give `req` a new engine id (a resubmission): deltas under the old one are dropped."""
        self._by_engine.pop(req.engine_id, None)
        req.engine_id = engine_id
        self._by_engine[engine_id] = req

    def count_of(self, client: bytes) -> int:
        """Requests in flight of `client`."""
        return self._per_client.get(client, 0)

    def clients(self) -> list[bytes]:
        """The clients with requests in flight."""
        return list(self._per_client)

    def of_client(self, client: bytes) -> list[FrontendRequest]:
        return [r for r in self._by_request.values() if r.client == client]

    def held(self) -> list[FrontendRequest]:
        """The requests waiting for a ready scheduler."""
        return [r for r in self._by_request.values() if r.held]
