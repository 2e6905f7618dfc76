"""A tiny OpenAI-compatible server for the bench's HTTP driver: no model, known answers.

`POST /v1/completions` streams exactly `max_tokens` tokens as vLLM streams them: one `data:`
event per chunk, the last text chunk with finish_reason "length", a usage chunk with empty
choices, then `data: [DONE]`. One chunk carries two tokens' text (as a server that holds back
partial UTF-8 sends them), so only the usage chunk gives the true count. `GET /v1/models`
lists one model. It listens on 127.0.0.1 only, on a free port, in a thread of its own (the
bench's CLI runs its own event loops).

faulty=True answers the 2nd..5th completions (the warm-up is the 1st) wrongly, one way each:
an HTTP 400 error object, an error object inside the stream, a stream that ends with no
finish reason and no [DONE], and an early stop (finish_reason "stop": ignore_eos ignored).
"""

from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

MODEL = "fake-model"
OWNER = "fakellm"
CHUNK_DELAY_S = 0.003  # between chunks: distinct arrival times, a TPOT well over 1 ms


def _chunk(choices: list[dict], usage: dict | None = None) -> bytes:
    body = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": MODEL,
            "choices": choices, "usage": usage}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _text(text: str, finish: str | None = None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}


def _error(message: str, code: int = 400) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": code}}


def _invalid(body: dict, model: str = MODEL) -> str | None:
    """What the bench must send; a 400 names the first thing that is not so."""
    checks = {"model": body.get("model") == model,
              "prompt": isinstance(body.get("prompt"), list) and all(type(t) is int for t in body["prompt"]),
              "max_tokens": type(body.get("max_tokens")) is int and body["max_tokens"] > 0,
              "temperature": body.get("temperature") == 0, "stream": body.get("stream") is True,
              "stream_options": body.get("stream_options") == {"include_usage": True},
              "ignore_eos": body.get("ignore_eos") is True}
    return next((name for name, ok in checks.items() if not ok), None)


class FakeOpenAIServer:
    def __init__(self, faulty: bool = False, api_key: str | None = None, model: str = MODEL, port: int = 0):
        self.faulty, self.api_key, self.model, self.port = faulty, api_key, model, port
        self.bodies: list[dict] = []  # every completion request, in arrival order
        self.auth: list[str | None] = []  # its Authorization header
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": OWNER, "max_model_len": 2048}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        number = len(self.bodies)  # 1-based, counted before any await: arrival order
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(_error("invalid API key", 401), status=401)
        if (field := _invalid(body, self.model)) is not None:
            return web.json_response(_error(f"invalid field {field}"), status=400)
        if self.faulty and number == 2:
            return web.json_response(_error("prompt is too long for this fake"), status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        n = body["max_tokens"]
        if self.faulty and number in (3, 4, 5):
            for i in range(2):
                await resp.write(_chunk([_text(f" t{i}")]))
                await asyncio.sleep(CHUNK_DELAY_S)
            if number == 3:
                await resp.write(b"data: " + json.dumps(_error("out of KV blocks", 500)).encode() + b"\n\n")
            elif number == 5:  # stops early, as a server that ignores ignore_eos does at EOS
                await resp.write(_chunk([_text("", "stop")]))
                await resp.write(_chunk([], {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2,
                                             "total_tokens": len(body["prompt"]) + 2}))
            if number != 4:  # 4: the stream just ends (no finish reason, no [DONE])
                await resp.write(b"data: [DONE]\n\n")
            return resp
        texts = [f" t{i}" for i in range(n)]
        if n >= 4:  # two tokens' text in one chunk
            texts[1:3] = [texts[1] + texts[2]]
        for i, text in enumerate(texts):
            await resp.write(_chunk([_text(text, "length" if i == len(texts) - 1 else None)]))
            await asyncio.sleep(CHUNK_DELAY_S)
        await resp.write(_chunk([], {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                     "total_tokens": len(body["prompt"]) + n}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # port 0: a free one
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
