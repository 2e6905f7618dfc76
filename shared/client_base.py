"""What the blocking and the asyncio clients share: errors, frames, liveness, the stream base.

The SDK itself is shared/client.py (`Client`) and shared/async_client.py (`AsyncClient`).
"""

from __future__ import annotations

import time
import uuid

import msgspec

from shared import protocol as p
from shared.ipc import MAX_FRAME_BYTES
from shared.protocol import ChatMessage, Completion, ErrorCode, SamplingParams

DEFAULT_TIMEOUT_S = 600.0  # no message for a request this long -> "unavailable"
CONTROL_TIMEOUT_S = 10.0  # health and stats
# The frontend sends a KeepAlive every second to each client with requests in flight: nothing at
# all from it for this long means it died (or the network did). Requests in flight then fail with
# "unavailable"; the socket reconnects by itself, so new requests reach a restarted frontend.
DEFAULT_LIVENESS_TIMEOUT_S = 10.0
LIVENESS_POLL_S = 0.5
# A socket has no peer to queue for only when the server refused the connection (a CURVE key it
# does not allow, or plaintext to a CURVE server): ZeroMQ then stops reconnecting.
NO_PEER = "cannot reach {}: the connection was refused (CURVE keys?)"


class RequestError(Exception):
    """A request failed. `code` is an `ErrorCode` value; `message` names the problem."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def bounded_frame(encoder: msgspec.msgpack.Encoder, msg) -> bytes:
    """`msg` encoded; a frame the server would refuse (ZMQ_MAXMSGSIZE closes the connection
    without a word) is refused here instead, with a typed error."""
    frame = encoder.encode(msg)
    if len(frame) > MAX_FRAME_BYTES:
        raise RequestError(ErrorCode.INVALID_REQUEST.value, f"the request is {len(frame)} bytes encoded; the server "
                           f"takes frames of at most {MAX_FRAME_BYTES} bytes", getattr(msg, "request_id", None))
    return frame


def new_request_id() -> str:
    return uuid.uuid4().hex


def generate_msg(prompt, params, prompt_token_ids, messages, stream, request_id, priority,
                 traceparent: str | None = None) -> p.Generate:
    """`traceparent`: a W3C trace context header ("00-<trace id>-<parent id>-<flags>") to join the
    caller's trace: its trace id goes on the request's events (and its span, with tracing on). The
    server checks it; a malformed one is ignored with a warning in its log, never an error."""
    if isinstance(prompt, list) and prompt_token_ids is None and all(isinstance(t, int) for t in prompt):
        prompt, prompt_token_ids = None, prompt
    chat = [m if isinstance(m, ChatMessage) else ChatMessage(role=m["role"], content=m["content"])
            for m in messages] if messages is not None else None
    return p.Generate(request_id=request_id or new_request_id(), params=params or SamplingParams(), prompt=prompt,
                      messages=chat, prompt_token_ids=prompt_token_ids, stream=stream, priority=priority,
                      traceparent=traceparent or None)


def beam_search_params(width: int, *, n: int = 1, max_tokens: int | None = 16, length_penalty: float = 1.0,
                       early_stopping: bool | str = False, **params) -> SamplingParams:
    """SamplingParams for beam search: `width` beams (best_of), the `n` best hypotheses returned,
    best first, each with `cumulative_logprob` and `beam_score` (temperature 0: beam search does
    not sample). `params`: other SamplingParams fields (stop_token_ids, ignore_eos, ...)."""
    return SamplingParams(use_beam_search=True, best_of=width, n=n, max_tokens=max_tokens, temperature=0.0,
                          length_penalty=length_penalty, early_stopping=early_stopping, **params)


def raise_if_error(msg: p.ServerMessage) -> None:
    if isinstance(msg, p.ErrorReply):
        raise RequestError(msg.code, msg.message, msg.request_id)


class StreamBase:
    """Iterates `Delta`s; after the last one, `completion` holds the final `Completion`."""

    completion: Completion | None = None
    request_id: str = ""




class ClientBase:
    def __init__(self, address: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                 liveness_timeout: float | None = DEFAULT_LIVENESS_TIMEOUT_S):
        self.address = address
        self.timeout = timeout
        self.liveness_timeout = liveness_timeout
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = p.decoder_for(p.ServerMessage)
        self._last_heard = 0.0  # monotonic seconds: the last message from the server
        self._sent_at: dict[str, float] = {}  # request id -> when it was sent

    def _check_alive(self, rid: str) -> None:
        """Raise `unavailable` when the server has said nothing, not even a KeepAlive, for
        liveness_timeout since this request was sent."""
        if self.liveness_timeout is None:
            return
        heard = max(self._last_heard, self._sent_at.get(rid, 0.0))
        if time.monotonic() - heard > self.liveness_timeout:
            raise RequestError(ErrorCode.UNAVAILABLE.value,
                               f"lost the server at {self.address}: nothing from it for {self.liveness_timeout} s",
                               rid)

