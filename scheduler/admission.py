"""Admission: reject at once what is malformed, can never fit, or finds the queue full.

The checks the frontend runs too (shapes, ranges, lengths, KV capacity) are
shared/validation.py's, with the same messages; here are only those that need
the scheduler's state: request ids in flight, the waiting queue's bound, and a
resubmission's outputs so far. Everything admitted fits the KV cache on its
own, which is what lets the policy promise progress.
"""

from __future__ import annotations

from shared.protocol import AddRequest, ErrorCode
from shared.validation import Limits, Rejected, check_request

__all__ = ["Limits", "Rejected", "check_admission"]


def check_admission(msg: AddRequest, limits: Limits, *, in_flight: bool, num_waiting: int, max_waiting: int) -> int:
    """`msg`'s resolved max_tokens (tokens per output), or raise `Rejected`.

    `in_flight`: a request with this id is in flight; `num_waiting`: sequences queued for
    admission now, at most `max_waiting` (backpressure: a bounded queue, never silence).
    Costs O(prompt length)."""
    if in_flight:
        raise Rejected(ErrorCode.INVALID_REQUEST, f"request id {msg.request_id!r} is already in flight")
    if num_waiting >= max_waiting:
        raise Rejected(ErrorCode.OVERLOADED, f"{num_waiting} sequences are waiting already "
                                             f"(max_waiting {max_waiting}): retry later")
    max_tokens = check_request(msg.prompt_token_ids, msg.params, limits, msg.arrival_time)
    if len(msg.output_token_ids) > msg.params.n or any(len(t) >= max_tokens for t in msg.output_token_ids):
        raise Rejected(ErrorCode.INVALID_REQUEST, "output_token_ids: more outputs than n, or one that "
                                                  "already reached max_tokens")
    return max_tokens
