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

import asyncio
import collections
import time
import uuid
from typing import Any, AsyncIterator, Iterator

import msgspec
import zmq
import zmq.asyncio

from shared import protocol as p
from shared.curve import CurveKeys
from shared.ipc import MAX_FRAME_BYTES, make_dealer
from shared.protocol import ChatMessage, Completion, Delta, ErrorCode, SamplingParams

DEFAULT_TIMEOUT_S = 600.0  # no message for a request this long -> "unavailable"
CONTROL_TIMEOUT_S = 10.0  # health and stats
# The frontend sends a KeepAlive every second to each client with requests in flight: nothing at
# all from it for this long means it died (or the network did). Requests in flight then fail with
# "unavailable"; the socket reconnects by itself, so new requests reach a restarted frontend.
DEFAULT_LIVENESS_TIMEOUT_S = 10.0
_LIVENESS_POLL_S = 0.5
# A socket has no peer to queue for only when the server refused the connection (a CURVE key it
# does not allow, or plaintext to a CURVE server): ZeroMQ then stops reconnecting.
_NO_PEER = "cannot reach {}: the connection was refused (CURVE keys?)"


class RequestError(Exception):
    """A request failed. `code` is an `ErrorCode` value; `message` names the problem."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def _bounded_frame(encoder: msgspec.msgpack.Encoder, msg) -> bytes:
    """`msg` encoded; a frame the server would refuse (ZMQ_MAXMSGSIZE closes the connection
    without a word) is refused here instead, with a typed error."""
    frame = encoder.encode(msg)
    if len(frame) > MAX_FRAME_BYTES:
        raise RequestError(ErrorCode.INVALID_REQUEST.value, f"the request is {len(frame)} bytes encoded; the server "
                           f"takes frames of at most {MAX_FRAME_BYTES} bytes", getattr(msg, "request_id", None))
    return frame


def _new_id() -> str:
    return uuid.uuid4().hex


def _generate_msg(prompt, params, prompt_token_ids, messages, stream, request_id, priority) -> p.Generate:
    if isinstance(prompt, list) and prompt_token_ids is None and all(isinstance(t, int) for t in prompt):
        prompt, prompt_token_ids = None, prompt
    chat = [m if isinstance(m, ChatMessage) else ChatMessage(role=m["role"], content=m["content"])
            for m in messages] if messages is not None else None
    return p.Generate(request_id=request_id or _new_id(), params=params or SamplingParams(), prompt=prompt,
                      messages=chat, prompt_token_ids=prompt_token_ids, stream=stream, priority=priority)


def _raise_if_error(msg: p.ServerMessage) -> None:
    if isinstance(msg, p.ErrorReply):
        raise RequestError(msg.code, msg.message, msg.request_id)


class _Stream:
    """Iterates `Delta`s; after the last one, `completion` holds the final `Completion`."""

    completion: Completion | None = None
    request_id: str = ""


class Stream(_Stream):
    def __init__(self, client: "Client", msg: p.Generate, timeout: float | None):
        self._client, self._msg, self._timeout = client, msg, timeout
        self.request_id = msg.request_id

    def __iter__(self) -> Iterator[Delta]:
        c, rid = self._client, self.request_id
        c._send(self._msg)
        try:
            while True:
                msg = c._next_for(rid, self._timeout)
                _raise_if_error(msg)
                if isinstance(msg, Completion):
                    self.completion = msg
                    return
                yield msg
        finally:
            if self.completion is None:  # left early or failed: free its server-side blocks
                c._forget(rid, abort=True)
            else:
                c._forget(rid, abort=False)


class AsyncStream(_Stream):
    def __init__(self, client: "AsyncClient", msg: p.Generate, timeout: float | None):
        self._client, self._msg, self._timeout = client, msg, timeout
        self.request_id = msg.request_id

    async def __aiter__(self) -> AsyncIterator[Delta]:
        c, rid = self._client, self.request_id
        queue = c._open(rid)
        await c._send(self._msg)
        try:
            while True:
                msg = await c._next_for(queue, rid, self._timeout)
                _raise_if_error(msg)
                if isinstance(msg, Completion):
                    self.completion = msg
                    return
                yield msg
        finally:
            await c._close(rid, abort=self.completion is None)


class _Base:
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


class Client(_Base):
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
        frame = _bounded_frame(self._encoder, msg)
        self._inbox.setdefault(msg.request_id, collections.deque())
        self._sent_at[msg.request_id] = time.monotonic()
        try:  # never blocks while connected (unbounded queue); a socket with no peer at all raises
            self._sock.send(frame, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise RequestError(ErrorCode.UNAVAILABLE.value, _NO_PEER.format(self.address), msg.request_id) from None

    def _next_for(self, rid: str, timeout: float | None) -> p.ServerMessage:
        box = self._inbox.setdefault(rid, collections.deque())
        deadline = None if timeout is None else time.monotonic() + timeout
        while not box:
            wait_s = _LIVENESS_POLL_S if deadline is None else min(_LIVENESS_POLL_S, deadline - time.monotonic())
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
        _raise_if_error(reply)
        return reply

    def _complete(self, msg: p.Generate, timeout) -> Completion:
        self._send(msg)
        done = False
        try:
            while True:
                reply = self._next_for(msg.request_id, timeout)
                _raise_if_error(reply)
                if isinstance(reply, Completion):
                    done = True
                    return reply
        finally:
            self._forget(msg.request_id, abort=not done)

    # -- API ----------------------------------------------------------------
    def generate(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
                 prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                 priority: int = 0, timeout: float | None = None) -> Completion:
        msg = _generate_msg(prompt, params, prompt_token_ids, None, False, request_id, priority)
        return self._complete(msg, timeout or self.timeout)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
             request_id: str | None = None, priority: int = 0, timeout: float | None = None) -> Completion:
        msg = _generate_msg(None, params, None, messages, False, request_id, priority)
        return self._complete(msg, timeout or self.timeout)

    def stream(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
               prompt_token_ids: list[int] | None = None, request_id: str | None = None,
               priority: int = 0, timeout: float | None = None) -> Stream:
        msg = _generate_msg(prompt, params, prompt_token_ids, None, True, request_id, priority)
        return Stream(self, msg, timeout or self.timeout)

    def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0, timeout: float | None = None) -> Stream:
        msg = _generate_msg(None, params, None, messages, True, request_id, priority)
        return Stream(self, msg, timeout or self.timeout)

    def abort(self, request_id: str) -> None:
        """Ask the server to stop `request_id`; its stream ends with finish_reason "abort"."""
        self._sock.send(self._encoder.encode(p.Abort(request_id=request_id)))

    def health(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        reply = self._call(p.HealthCheck(request_id=_new_id()), timeout)
        return msgspec.structs.asdict(reply)

    def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return self._call(p.GetStats(request_id=_new_id()), timeout).stats

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client: any number of concurrent requests over one socket."""

    def __init__(self, address: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                 liveness_timeout: float | None = DEFAULT_LIVENESS_TIMEOUT_S, curve: CurveKeys | None = None):
        super().__init__(address, timeout=timeout, liveness_timeout=liveness_timeout)
        self._ctx = zmq.asyncio.Context()
        self._sock = make_dealer(self._ctx)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(address)
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    # -- plumbing ---------------------------------------------------------
    def _open(self, rid: str) -> asyncio.Queue:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        queue = self._queues[rid] = asyncio.Queue()
        return queue

    async def _read_loop(self) -> None:
        while True:
            frame = await self._sock.recv()
            self._last_heard = time.monotonic()
            try:
                msg = self._decoder.decode(frame)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            if isinstance(msg, p.KeepAlive):
                continue  # the server's connection probe: nothing to deliver
            queue = self._queues.get(msg.request_id)
            if queue is not None:
                queue.put_nowait(msg)

    async def _send(self, msg) -> None:
        frame = _bounded_frame(self._encoder, msg)
        if not isinstance(msg, p.Abort):
            self._sent_at[msg.request_id] = time.monotonic()
        try:
            await self._sock.send(frame, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise RequestError(ErrorCode.UNAVAILABLE.value, _NO_PEER.format(self.address), msg.request_id) from None

    async def _next_for(self, queue: asyncio.Queue, rid: str, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while queue.empty():
            wait_s = _LIVENESS_POLL_S if deadline is None else min(_LIVENESS_POLL_S, deadline - time.monotonic())
            if wait_s <= 0:
                raise RequestError(ErrorCode.UNAVAILABLE.value,
                                   f"no reply from {self.address} within {timeout} s", rid)
            try:
                return await asyncio.wait_for(queue.get(), wait_s)
            except asyncio.TimeoutError:
                self._check_alive(rid)
        return queue.get_nowait()

    async def _close(self, rid: str, *, abort: bool) -> None:
        self._queues.pop(rid, None)
        self._sent_at.pop(rid, None)
        if abort and not self._sock.closed:
            try:
                await self._send(p.Abort(request_id=rid))
            except RequestError:
                pass  # no server to tell

    async def _call(self, msg, timeout: float | None):
        queue = self._open(msg.request_id)
        try:
            await self._send(msg)
            reply = await self._next_for(queue, msg.request_id, timeout)
        finally:
            self._queues.pop(msg.request_id, None)
            self._sent_at.pop(msg.request_id, None)
        _raise_if_error(reply)
        return reply

    async def _complete(self, msg: p.Generate, timeout) -> Completion:
        stream = AsyncStream(self, msg, timeout)
        async for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    # -- API ----------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
                       prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                       priority: int = 0, timeout: float | None = None) -> Completion:
        msg = _generate_msg(prompt, params, prompt_token_ids, None, False, request_id, priority)
        return await self._complete(msg, timeout or self.timeout)

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                   request_id: str | None = None, priority: int = 0, timeout: float | None = None) -> Completion:
        msg = _generate_msg(None, params, None, messages, False, request_id, priority)
        return await self._complete(msg, timeout or self.timeout)

    def stream(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
               prompt_token_ids: list[int] | None = None, request_id: str | None = None,
               priority: int = 0, timeout: float | None = None) -> AsyncStream:
        msg = _generate_msg(prompt, params, prompt_token_ids, None, True, request_id, priority)
        return AsyncStream(self, msg, timeout or self.timeout)

    def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0,
                    timeout: float | None = None) -> AsyncStream:
        msg = _generate_msg(None, params, None, messages, True, request_id, priority)
        return AsyncStream(self, msg, timeout or self.timeout)

    async def abort(self, request_id: str) -> None:
        await self._send(p.Abort(request_id=request_id))

    async def health(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        reply = await self._call(p.HealthCheck(request_id=_new_id()), timeout)
        return msgspec.structs.asdict(reply)

    async def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return (await self._call(p.GetStats(request_id=_new_id()), timeout)).stats

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
