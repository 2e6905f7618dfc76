"""One HTTP generation request, from its submission to its last byte.

The request is submitted as the `Generate` a ZeroMQ client would send, under an HTTP identity
of its own (frontend/http/replies.py); its replies arrive on a queue. A streamed request's
response starts with its first reply, so an error the scheduler answers before any token
(overloaded, say) is still an HTTP status, not an event inside a 200 stream. After that, each
wake-up turns what is queued into SSE events and writes them at once: one write per token when
the client keeps up, fewer when it does not.

A client that disconnects (uvicorn reports `http.disconnect` on the ASGI receive channel) has
its request aborted at once, so its KV blocks are freed, whether it was streaming or waiting
for a whole answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from frontend.http.errors import ApiError
from frontend.http.render import DONE, sse
from frontend.http.replies import ReplyRouter
from shared import protocol as p
from shared.validation import Rejected

DISCONNECTED = object()  # queued by the disconnect watcher
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # proxies such as nginx would otherwise buffer the stream

Submit = Callable[[bytes, p.Generate], Awaitable[None]]  # raises Rejected
Abort = Callable[[bytes, str], Awaitable[None]]  # (client, request id)


class Generation:
    """Runs generation requests for the routes. Owns nothing between requests: each request's
    queue is the router's, registered for exactly as long as its exchange runs."""

    def __init__(self, replies: ReplyRouter, submit: Submit, abort: Abort) -> None:
        self._replies = replies
        self._submit = submit
        self._abort = abort

    async def run(self, request: Request, msg: p.Generate, make_renderer: Callable[[], object]) -> Response:
        """Submit `msg` and answer with its result. `make_renderer` is called once the request is
        admitted (its n is valid then). Raises ApiError for a request refused at once."""
        client, queue = self._replies.open()
        try:
            await self._submit(client, msg)
        except Rejected as e:
            self._replies.close(client)
            raise ApiError.from_code(e.code, e.message) from None
        except BaseException:
            self._replies.close(client)
            raise
        renderer = make_renderer()
        watcher = asyncio.create_task(_watch_disconnect(request.receive, queue))
        handed_over = False
        try:
            first = await queue.get()
            if first is DISCONNECTED:
                await self._abort(client, msg.request_id)
                return Response(status_code=499)  # nobody reads it: the client is gone
            if isinstance(first, p.ErrorReply):  # logged as request.error by the router
                return ApiError.from_code(first.code, first.message).response()
            if not msg.stream:
                return Response(renderer.response(first), media_type="application/json")
            handed_over = True
            return EventStream(first, queue, renderer, on_done=lambda: self._done(client, watcher),
                               on_disconnect=lambda: self._abort(client, msg.request_id))
        except asyncio.CancelledError:  # uvicorn gave up on the connection (a shutdown past its timeout)
            await self._abort(client, msg.request_id)
            raise
        finally:
            if not handed_over:
                self._done(client, watcher)

    def _done(self, client: bytes, watcher: asyncio.Task) -> None:
        watcher.cancel()
        self._replies.close(client)


class EventStream:
    """The ASGI response of a streamed request: SSE events until [DONE].

    Per wake-up: every reply queued so far becomes its event(s), written with one `send`. An
    error after the stream began becomes an `{"error": ...}` event (the openai client raises it)
    followed by [DONE]."""

    def __init__(self, first, queue: asyncio.Queue, renderer, on_done: Callable[[], None],
                 on_disconnect: Callable[[], Awaitable[None]]) -> None:
        self._first = first
        self._queue = queue
        self._renderer = renderer
        self._on_done = on_done
        self._on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            msg = self._first
            while True:
                events, done = self._render_queued(msg)
                if events is None:
                    await self._on_disconnect()
                    return
                if events or done:
                    await send({"type": "http.response.body", "body": events, "more_body": not done})
                if done:
                    return
                msg = await self._queue.get()
        except asyncio.CancelledError:
            await self._on_disconnect()
            raise
        finally:
            self._on_done()

    def _render_queued(self, msg) -> tuple[bytes | None, bool]:
        """`msg` and whatever else is queued, as SSE bytes; and whether the stream ended.
        None: the client disconnected."""
        parts = []
        queue = self._queue
        while True:
            if isinstance(msg, p.Delta):
                parts.append(self._renderer.chunk(msg))
            elif isinstance(msg, p.Completion):
                if self._renderer.include_usage:
                    parts.append(self._renderer.usage_chunk(msg))
                parts.append(DONE)
                return b"".join(parts), True
            elif isinstance(msg, p.ErrorReply):
                parts += [sse(ApiError.from_code(msg.code, msg.message).body()), DONE]
                return b"".join(parts), True
            elif msg is DISCONNECTED:
                return None, True
            if queue.empty():
                return b"".join(parts), False
            msg = queue.get_nowait()


async def _watch_disconnect(receive, queue: asyncio.Queue) -> None:
    """Wait for the client to go away, then queue DISCONNECTED. The body was read already, so
    the receive channel has nothing else to say (uvicorn also reports a disconnect once the
    response is complete; by then this task is cancelled, or nobody reads the queue)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            queue.put_nowait(DISCONNECTED)
            return
