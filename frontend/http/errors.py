"""Errors in OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with the
HTTP status that fits each of our `ErrorCode`s.

| ErrorCode | status | type | code |
|---|---|---|---|
| invalid_request | 400 | invalid_request_error | invalid_request |
| too_long | 400 | invalid_request_error | context_length_exceeded (OpenAI's) |
| overloaded | 429 (+ Retry-After) | rate_limit_error | overloaded |
| unavailable, shutting_down | 503 | server_error | unavailable, shutting_down |
| internal | 500 | server_error | internal |

and, for HTTP alone: 401 invalid_api_key, 404 model_not_found / not_found, 405, 413.
"""

from __future__ import annotations

import re

import msgspec
from starlette.responses import Response

from shared.protocol import ErrorCode, SamplingParams

RETRY_AFTER_S = 1  # overloaded: a bounded queue is full; a second is several scheduler steps

_BY_CODE: dict[str, tuple[int, str, str]] = {  # ErrorCode value -> (status, type, code)
    ErrorCode.INVALID_REQUEST.value: (400, "invalid_request_error", "invalid_request"),
    ErrorCode.TOO_LONG.value: (400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.OVERLOADED.value: (429, "rate_limit_error", "overloaded"),
    ErrorCode.UNAVAILABLE.value: (503, "server_error", "unavailable"),
    ErrorCode.SHUTTING_DOWN.value: (503, "server_error", "shutting_down"),
    ErrorCode.NOT_FOUND.value: (404, "invalid_request_error", "not_found"),
    ErrorCode.INTERNAL.value: (500, "server_error", "internal"),
}
_SAMPLING_FIELDS = frozenset(f.name for f in msgspec.structs.fields(SamplingParams))
_LEADING_NAME = re.compile(r"^(?:at most \d+ )?([a-z_]+)")


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ApiError(Exception):
    """A request we answer with an error object. `param`: the request field at fault, if one is.
    `ours`: the ErrorCode value logged in `request.error` (the HTTP-only errors have their own)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, ours: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.ours = ours or code or "invalid_request"

    @classmethod
    def from_code(cls, code: ErrorCode | str, message: str, param: str | None = None) -> ApiError:
        """From an `ErrorReply` or a `Rejected`: what the ZeroMQ SDK would have raised."""
        value = code.value if isinstance(code, ErrorCode) else code
        status, kind, public = _BY_CODE.get(value, _BY_CODE[ErrorCode.INTERNAL.value])
        if param is None and value in (ErrorCode.INVALID_REQUEST.value, ErrorCode.TOO_LONG.value):
            param = param_of(message)
        return cls(status, message, type=kind, param=param, code=public, ours=value)

    def response(self) -> Response:
        headers = {"retry-after": str(RETRY_AFTER_S)} if self.status == 429 else None
        return Response(self.body(), status_code=self.status, headers=headers, media_type="application/json")

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorBody(ErrorDetail(self.message, self.type, self.param, self.code)))


def param_of(message: str) -> str | None:
    """The request field a validator's message names first ("max_tokens must be >= 1 ...",
    shared/protocol.py), when it is a sampling field; for a too-long prompt, "messages" or
    "prompt" would be as right as anything, so None."""
    match = _LEADING_NAME.match(message)
    return match.group(1) if match and match.group(1) in _SAMPLING_FIELDS else None


def bad_field(param: str, message: str) -> ApiError:
    """400 for a field we cannot take (or honour) as given."""
    return ApiError(400, message, param=param, code="invalid_request")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", ours="unauthorized")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"the model `{model}` does not exist: GET /v1/models lists the one served here",
                    param="model", code="model_not_found")
