"""W3C trace context (https://www.w3.org/TR/trace-context/): a request's `traceparent`, checked.

A client may send `Generate.traceparent` (the SDK's `traceparent=` argument; HTTP copies its
`traceparent` header there). The frontend keeps it on the `FrontendRequest` when it is well
formed, sends its trace id to the scheduler (`AddRequest.trace_id`), and every event of the
request carries `trace_id` (docs/events.md). A malformed one is ignored with a warning
(`frontend.bad_traceparent`), never an error: tracing must not fail a request.
"""

from __future__ import annotations

import re

from shared.logging import get_logger

log = get_logger()

# version "-" trace-id "-" parent-id "-" flags, lowercase hex. Version 00 is exactly this; a later
# version may append "-..." fields, which we do not read (the spec's rule for versions it does not know).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_ZERO_TRACE_ID, _ZERO_PARENT_ID = "0" * 32, "0" * 16
MAX_LOGGED_CHARS = 100  # of a bad value, in its warning


def parse_traceparent(value: str) -> str | None:
    """`value` without surrounding whitespace when it is a valid traceparent, else None."""
    value = value.strip(" \t")
    found = _TRACEPARENT.fullmatch(value)
    if found is None:
        return None
    version, trace_id, parent_id, _flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return value


def checked_traceparent(value: str | None, request_id: str) -> str:
    """The traceparent a request keeps: `value` when valid, else "" (logged when it was given)."""
    if not value:
        return ""
    valid = parse_traceparent(value)
    if valid is None:
        log.warning("frontend.bad_traceparent", request_id=request_id, traceparent=value[:MAX_LOGGED_CHARS])
        return ""
    return valid


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id of a checked traceparent; "" for none."""
    return traceparent[3:35]


def message_trace_id(msg) -> str:
    """The trace id of a client message's traceparent when valid (a `Generate`), else "": for the
    `request.error` of a request refused before it became a `FrontendRequest`. Logs nothing."""
    valid = parse_traceparent(getattr(msg, "traceparent", None) or "")
    return trace_id_of(valid) if valid else ""


def traceparent_of(req) -> str:
    """A `FrontendRequest`'s checked traceparent ("" for none)."""
    return req.traceparent  # checked by Intake (see docs/metrics.md, trace context)


def trace_fields(req) -> dict[str, str]:
    """`trace_id` for a request's events, when it has one (docs/events.md: `trace_id?`)."""
    traceparent = traceparent_of(req)
    return {"trace_id": trace_id_of(traceparent)} if traceparent else {}
