"""Structured requests wait here for their grammar: no sequence, no KV blocks, no queue place.

A request whose grammar is cached goes straight on; the others are parked until the
compiler's future is done (the loop is woken then and calls `admit_ready`). A grammar that
fails is an `invalid_request` rejection to that client alone; nothing else waits for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future

from scheduler.grammar_compiler import CompiledGrammar, GrammarCompiler, GrammarError, NoTokenizer
from shared.logging import get_logger
from shared.protocol import AddRequest, ErrorCode, RequestRejected

log = get_logger("scheduler")

# Admits a request with its grammar (RequestTable.add): None, or its rejection.
Admit = Callable[[AddRequest, bytes, CompiledGrammar], RequestRejected | None]
Rejections = list[tuple[bytes, RequestRejected]]  # (frontend identity, rejection)


class GrammarIntake:
    """Owns the parked requests (request id -> message, frontend, future), in arrival order."""

    def __init__(self, compiler: GrammarCompiler, admit: Admit) -> None:
        self.compiler = compiler
        self._admit = admit
        self._parked: dict[str, tuple[AddRequest, bytes, Future]] = {}
        self.counters = {"structured_requests": 0, "structured_rejected": 0}  # totals since start

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parked

    def add(self, msg: AddRequest, frontend: bytes) -> RequestRejected | None:
        """Admit `msg` now if its grammar is ready, else park it; a rejection if it cannot be."""
        if msg.request_id in self._parked:
            return RequestRejected(msg.request_id, ErrorCode.INVALID_REQUEST.value,
                                   f"request id {msg.request_id!r} is already in flight")
        self.counters["structured_requests"] += 1
        future = self.compiler.compile(msg.params.structured_outputs)
        if future.done():
            return self._finish(msg, frontend, future)
        self._parked[msg.request_id] = (msg, frontend, future)
        return None

    def admit_ready(self) -> Rejections:
        """Admit (or reject) every parked request whose grammar is done; returns the rejections."""
        rejections = []
        for request_id, (msg, frontend, future) in list(self._parked.items()):
            if not future.done():
                continue
            del self._parked[request_id]
            rejected = self._finish(msg, frontend, future)
            if rejected is not None:
                rejections.append((frontend, rejected))
        return rejections

    def remove(self, request_ids: Iterable[str]) -> list[tuple[bytes, str, int]]:
        """Forget these parked requests (aborted); returns (frontend, request id, n) of those found."""
        removed = []
        for request_id in request_ids:
            parked = self._parked.pop(request_id, None)
            if parked is not None:
                removed.append((parked[1], request_id, parked[0].params.n))
        return removed

    def ids_of_frontend(self, frontend: bytes) -> list[str]:
        return [rid for rid, (_, ident, _) in self._parked.items() if ident == frontend]

    def ids(self) -> list[str]:
        return list(self._parked)

    def _finish(self, msg: AddRequest, frontend: bytes, future: Future) -> RequestRejected | None:
        try:
            grammar = future.result()
        except GrammarError as e:
            if isinstance(e, NoTokenizer):
                self.compiler.forget(msg.params.structured_outputs)
            return self._reject(msg, str(e))
        except Exception as e:  # a compiler bug must fail this request only
            log.exception("structured.compile_crashed", request_id=msg.request_id)
            return self._reject(msg, f"the grammar could not be compiled: {e!r}")
        try:
            return self._admit(msg, frontend, grammar)
        except GrammarError as e:  # a resubmission whose tokens do not match
            return self._reject(msg, str(e))

    def _reject(self, msg: AddRequest, reason: str) -> RequestRejected:
        self.counters["structured_rejected"] += 1
        log.info("request.rejected", request_id=msg.request_id, code=ErrorCode.INVALID_REQUEST.value,
                 reason=reason, **({"trace_id": msg.trace_id} if msg.trace_id else {}))
        return RequestRejected(msg.request_id, ErrorCode.INVALID_REQUEST.value, f"structured_outputs: {reason}")
