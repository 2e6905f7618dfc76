"""The client SDK: `Client` (blocking) and `AsyncClient` (asyncio), same methods.

    with Client("tcp://127.0.0.1:8765") as c:
        out = c.generate("Once upon a time", SamplingParams(max_tokens=32, temperature=0))
        for d in c.stream("Once upon a time", params): print(d.text, end="")

Every failure a request can meet surfaces as `RequestError` with a stable `.code`
(see `shared.protocol.ErrorCode`); a frontend that dies fails the requests in flight with
`unavailable` within `liveness_timeout`, and later requests reach it once it is back. Leaving a stream early, `abort(request_id)`, or closing
the client (even by the process dying) frees the request's server-side blocks: the frontend
probes its clients about once a second and aborts the requests of one that went away. A `Client` is not thread-safe (one ZeroMQ
socket); use one per thread, or one `AsyncClient` for many concurrent requests. With CURVE on the
server, pass `curve=CurveKeys.load(my.key_secret, server.key)` (shared/curve.py).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterator

import msgspec
import zmq
import zmq.asyncio

from shared import protocol as p
from shared.client_base import (
    CONTROL_TIMEOUT_S,
    DEFAULT_LIVENESS_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    LIVENESS_POLL_S,
    NO_PEER,
    ClientBase,
    RequestError,
    StreamBase,
    beam_search_params,
    bounded_frame,
    generate_msg,
    new_request_id,
    raise_if_error,
)
from shared.curve import CurveKeys
from shared.ipc import make_dealer
from shared.protocol import Completion, Delta, ErrorCode, SamplingParams


class Stream(StreamBase):
    def __init__(self, client: "Client", msg: p.Generate, timeout: float | None):
        self._client, self._msg, self._timeout = client, msg, timeout
        self.request_id = msg.request_id

    def __iter__(self) -> Iterator[Delta]:
        c, rid = self._client, self.request_id
        c._send(self._msg)
        try:
            while True:
                msg = c._next_for(rid, self._timeout)
                raise_if_error(msg)
                if isinstance(msg, Completion):
                    self.completion = msg
                    return
                yield msg
        finally:
            if self.completion is None:  # left early or failed: free its server-side blocks
                c._forget(rid, abort=True)
            else:
                c._forget(rid, abort=False)



class Client(ClientBase):
    """Blocking client. Methods mirror `AsyncClient`."""

    def __init__(self, address: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                 liveness_timeout: float | None = DEFAULT_LIVENESS_TIMEOUT_S, curve: CurveKeys | None = None):
        super().__init__(address, timeout=timeout, liveness_timeout=liveness_timeout)
        self._ctx = zmq.Context()
        self._sock = make_dealer(self._ctx)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(address)
        self._inbox: dict[str, collections.deque] = {}

    # -- plumbing ---------------------------------------------------------
    def _send(self, msg) -> None:
        frame = bounded_frame(self._encoder, msg)
        self._inbox.setdefault(msg.request_id, collections.deque())
        self._sent_at[msg.request_id] = time.monotonic()
        try:  # never blocks while connected (unbounded queue); a socket with no peer at all raises
            self._sock.send(frame, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise RequestError(ErrorCode.UNAVAILABLE.value, NO_PEER.format(self.address), msg.request_id) from None

    def _next_for(self, rid: str, timeout: float | None) -> p.ServerMessage:
        box = self._inbox.setdefault(rid, collections.deque())
        deadline = None if timeout is None else time.monotonic() + timeout
        while not box:
            wait_s = LIVENESS_POLL_S if deadline is None else min(LIVENESS_POLL_S, deadline - time.monotonic())
            if wait_s <= 0:
                raise RequestError(ErrorCode.UNAVAILABLE.value,
                                   f"no reply from {self.address} within {timeout} s", rid)
            if self._sock.poll(int(wait_s * 1000)):
                self._route(self._sock.recv())
            elif not box:
                self._check_alive(rid)
        return box.popleft()

    def _route(self, frame: bytes) -> None:
        self._last_heard = time.monotonic()
        try:
            msg = self._decoder.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return  # a newer server's message kind: ignore rather than fail every request
        if isinstance(msg, p.KeepAlive):
            return  # the server's connection probe: nothing to deliver
        box = self._inbox.get(msg.request_id)
        if box is not None:
            box.append(msg)

    def _forget(self, rid: str, *, abort: bool) -> None:
        self._inbox.pop(rid, None)
        self._sent_at.pop(rid, None)
        if abort and not self._sock.closed:
            try:
                self._sock.send(self._encoder.encode(p.Abort(request_id=rid)), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # no server to tell

    def _call(self, msg, timeout: float | None):
        self._send(msg)
        try:
            reply = self._next_for(msg.request_id, timeout)
        finally:
            self._inbox.pop(msg.request_id, None)
            self._sent_at.pop(msg.request_id, None)
        raise_if_error(reply)
        return reply

    def _complete(self, msg: p.Generate, timeout) -> Completion:
        self._send(msg)
        done = False
        try:
            while True:
                reply = self._next_for(msg.request_id, timeout)
                raise_if_error(reply)
                if isinstance(reply, Completion):
                    done = True
                    return reply
        finally:
            self._forget(msg.request_id, abort=not done)

    # -- API ----------------------------------------------------------------
    def generate(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
                 prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                 priority: int = 0, timeout: float | None = None,
                 traceparent: str | None = None) -> Completion:
        msg = generate_msg(prompt, params, prompt_token_ids, None, False, request_id, priority, traceparent)
        return self._complete(msg, timeout or self.timeout)

    def beam_search(self, prompt: str | list[int], width: int, *, n: int = 1, max_tokens: int | None = 16,
                    length_penalty: float = 1.0, early_stopping: bool | str = False,
                    timeout: float | None = None, **params) -> Completion:
        """`generate` with beam search (shared/client_base.py: `beam_search_params`): the n best of
        `width` beams, best first, scores on each output."""
        params = beam_search_params(width, n=n, max_tokens=max_tokens, length_penalty=length_penalty,
                                    early_stopping=early_stopping, **params)
        return self.generate(prompt, params, timeout=timeout)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
             request_id: str | None = None, priority: int = 0, timeout: float | None = None,
             traceparent: str | None = None) -> Completion:
        msg = generate_msg(None, params, None, messages, False, request_id, priority, traceparent)
        return self._complete(msg, timeout or self.timeout)

    def stream(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
               prompt_token_ids: list[int] | None = None, request_id: str | None = None,
               priority: int = 0, timeout: float | None = None,
               traceparent: str | None = None) -> Stream:
        msg = generate_msg(prompt, params, prompt_token_ids, None, True, request_id, priority, traceparent)
        return Stream(self, msg, timeout or self.timeout)

    def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0, timeout: float | None = None,
                    traceparent: str | None = None) -> Stream:
        msg = generate_msg(None, params, None, messages, True, request_id, priority, traceparent)
        return Stream(self, msg, timeout or self.timeout)

    def abort(self, request_id: str) -> None:
        """Ask the server to stop `request_id`; its stream ends with finish_reason "abort"."""
        self._sock.send(self._encoder.encode(p.Abort(request_id=request_id)))

    def health(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        reply = self._call(p.HealthCheck(request_id=new_request_id()), timeout)
        return msgspec.structs.asdict(reply)

    def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return self._call(p.GetStats(request_id=new_request_id()), timeout).stats

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The asyncio client lives in its own file; `from shared.client import AsyncClient` keeps working.

# The asyncio client lives in its own file; `from shared.client import AsyncClient` keeps working.
from shared.async_client import AsyncClient, AsyncStream  # noqa: E402, F401
