"""The asyncio client SDK: `AsyncClient`, the same methods as `Client` (shared/client.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

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


class AsyncStream(StreamBase):
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
                raise_if_error(msg)
                if isinstance(msg, Completion):
                    self.completion = msg
                    return
                yield msg
        finally:
            await c._close(rid, abort=self.completion is None)


class AsyncClient(ClientBase):
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
        frame = bounded_frame(self._encoder, msg)
        if not isinstance(msg, p.Abort):
            self._sent_at[msg.request_id] = time.monotonic()
        try:
            await self._sock.send(frame, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise RequestError(ErrorCode.UNAVAILABLE.value, NO_PEER.format(self.address), msg.request_id) from None

    async def _next_for(self, queue: asyncio.Queue, rid: str, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while queue.empty():
            wait_s = LIVENESS_POLL_S if deadline is None else min(LIVENESS_POLL_S, deadline - time.monotonic())
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
        raise_if_error(reply)
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
                       priority: int = 0, timeout: float | None = None,
                       traceparent: str | None = None) -> Completion:
        msg = generate_msg(prompt, params, prompt_token_ids, None, False, request_id, priority, traceparent)
        return await self._complete(msg, timeout or self.timeout)

    async def beam_search(self, prompt: str | list[int], width: int, *, n: int = 1, max_tokens: int | None = 16,
                          length_penalty: float = 1.0, early_stopping: bool | str = False,
                          timeout: float | None = None, **params) -> Completion:
        """`generate` with beam search (shared/client_base.py: `beam_search_params`): the n best of
        `width` beams, best first, scores on each output."""
        params = beam_search_params(width, n=n, max_tokens=max_tokens, length_penalty=length_penalty,
                                    early_stopping=early_stopping, **params)
        return await self.generate(prompt, params, timeout=timeout)

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                   request_id: str | None = None, priority: int = 0, timeout: float | None = None,
                   traceparent: str | None = None) -> Completion:
        msg = generate_msg(None, params, None, messages, False, request_id, priority, traceparent)
        return await self._complete(msg, timeout or self.timeout)

    def stream(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
               prompt_token_ids: list[int] | None = None, request_id: str | None = None,
               priority: int = 0, timeout: float | None = None,
               traceparent: str | None = None) -> AsyncStream:
        msg = generate_msg(prompt, params, prompt_token_ids, None, True, request_id, priority, traceparent)
        return AsyncStream(self, msg, timeout or self.timeout)

    def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0,
                    timeout: float | None = None, traceparent: str | None = None) -> AsyncStream:
        msg = generate_msg(None, params, None, messages, True, request_id, priority, traceparent)
        return AsyncStream(self, msg, timeout or self.timeout)

    async def abort(self, request_id: str) -> None:
        await self._send(p.Abort(request_id=request_id))

    async def health(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        reply = await self._call(p.HealthCheck(request_id=new_request_id()), timeout)
        return msgspec.structs.asdict(reply)

    async def stats(self, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        return (await self._call(p.GetStats(request_id=new_request_id()), timeout)).stats

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
