"""The OpenAI-compatible routes, as a Starlette app (a thin router; docs/http.md).

  POST /v1/completions, POST /v1/chat/completions   generation (frontend/http/exchange.py)
  GET  /v1/models                                   the served model
  GET  /health                                      200 only while the engine makes progress
  GET  /metrics                                     Prometheus text, from the `render_metrics` given

/v1/* need a bearer key when keys are set; /health and /metrics stay open (probes and scrapers
carry no keys; neither shows a prompt). Every error is OpenAI's error object, and every error
answered to a request is logged as `request.error` (request_id "" when none was assigned).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from frontend.http.auth import ApiKeys
from frontend.http.bodies import ChatBody, CompletionBody, decode_body
from frontend.http.errors import ApiError
from frontend.http.exchange import Generation
from frontend.http.health import HealthProbe
from frontend.http.logprobs import TokenTexts
from frontend.http.render import ChatRenderer, CompletionRenderer
from frontend.http.shapes import ModelCard, ModelList
from frontend.http.translate import chat_generate, completion_generate
from shared.logging import get_logger

log = get_logger()

# A prompt of the protocol's largest size (MAX_TEXT_CHARS, or MAX_PROMPT_TOKENS ids) fits; a
# body past this is refused before it is read whole.
MAX_BODY_BYTES = 32 << 20

RenderMetrics = Callable[[str], Awaitable[tuple[bytes, str]]]  # (Accept header) -> (body, content type)
_JSON = "application/json"
_encode = msgspec.json.encode


class HttpApi:
    """Holds the app and what its routes need; no state of its own but the start time."""

    def __init__(self, *, generation: Generation, keys: ApiKeys, health: HealthProbe, model: str,
                 max_model_len: Callable[[], int | None], texts: TokenTexts,
                 render_metrics: RenderMetrics | None) -> None:
        self._generation = generation
        self._keys = keys
        self._health = health
        self._model = model
        self._max_model_len = max_model_len
        self._texts = texts
        self._render_metrics = render_metrics
        self._created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_exception, Exception: self._internal_error})

    # -- generation ----------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "cmpl-", CompletionBody, completion_generate, CompletionRenderer)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chatcmpl-", ChatBody, chat_generate, ChatRenderer)

    async def _generate(self, request: Request, prefix: str, kind, translate, renderer) -> Response:
        request_id = prefix + uuid.uuid4().hex
        try:
            self._keys.check(request.headers.get("authorization"))
            body = decode_body(await _read_body(request), kind)
            msg = translate(body, request_id, self._model)
            traceparent = request.headers.get("traceparent")
            if traceparent:
                msg.traceparent = traceparent  # W3C trace context, as the SDK's optional field
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await self._generation.run(request, msg, lambda: renderer(
                request_id, int(time.time()), self._model, self._texts, body.n, include_usage))
        except ApiError as e:
            log.warning("request.error", request_id=request_id, code=e.ours, error=e.message)
            return e.response()
        except Exception as e:  # a bug must not take the frontend down for everyone
            log.exception("frontend.internal_error", request_id=request_id)
            return ApiError.from_code("internal", f"internal error: {e!r}").response()

    # -- the rest ------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        try:
            self._keys.check(request.headers.get("authorization"))
        except ApiError as e:
            log.warning("request.error", request_id="", code=e.ours, error=e.message)
            return e.response()
        card = ModelCard(id=self._model, created=self._created, max_model_len=self._max_model_len())
        return Response(_encode(ModelList([card])), media_type=_JSON)

    async def health(self, request: Request) -> Response:
        status, body = await self._health.check()
        return Response(_encode(body), status_code=status, media_type=_JSON)

    async def metrics(self, request: Request) -> Response:
        if self._render_metrics is None:
            return ApiError(404, "metrics are not served by this frontend", code="not_found").response()
        body, content_type = await self._render_metrics(request.headers.get("accept", ""))
        return Response(body, headers={"content-type": content_type})

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own errors (no such route: 404; wrong method: 405) as error objects."""
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}: see docs/http.md", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        log.warning("request.error", request_id="", code=code or str(exc.status_code), error=message)
        response = ApiError(exc.status_code, message, code=code).response()
        response.headers.update(exc.headers or {})
        return response


    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        """A bug outside the generation routes (those catch their own): an error object, logged."""
        log.error("frontend.internal_error", request_id="", exception=repr(exc))
        return ApiError.from_code("internal", f"internal error: {exc!r}").response()


async def _read_body(request: Request) -> bytes:
    """The whole body, or ApiError 413 past MAX_BODY_BYTES (announced or actual)."""
    announced = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    if announced.isdigit() and int(announced) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)
