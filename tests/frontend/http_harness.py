"""A real `FrontendServer` with its HTTP listener on loopback, without a scheduler or a model.

The scheduler is played by the test: `Harness.engine` records what the frontend sends it, and
`Harness.deliver` hands the frontend the scheduler's messages. Requests go over a real TCP
connection (`http`, a minimal HTTP/1.1 client on asyncio streams, so the bytes on the wire,
SSE framing included, are what the test sees).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Self

from frontend.server import FrontendServer
from shared import protocol as p
from shared.config import ServerConfig
from shared.drain import Drain

VOCAB = 100
KEY = "sk-test-key"


def info(**kw) -> p.EngineInfo:
    facts = {"ready": True, "model": "m", "max_model_len": 64, "vocab_size": VOCAB, "block_size": 4, "num_device_blocks": 32,
                 "workers_ready": 1, "workers_expected": 1, "scheduler_id": "s1", "max_num_batched_tokens": 64}
    return p.EngineInfo(**(facts | kw))


class FakeTokenizer:
    """One token per character (ord % VOCAB); a chat is its contents joined by '|'."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def encode_chat(self, messages):
        return self.encode("|".join(m["content"] for m in messages))

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Stands in for EngineClient's sends."""

    def __init__(self) -> None:
        self.added: list[p.AddRequest] = []
        self.aborted: list[str] = []
        self.added_event = asyncio.Event()

    async def add(self, request_id, prompt_ids, params, arrival, priority, *args, **kw) -> None:
        self.added.append(p.AddRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=params,
                                       arrival_time=arrival, priority=priority))
        self.added_event.set()

    async def abort(self, request_ids) -> None:
        self.aborted.extend(request_ids)

    async def finish_outputs(self, outputs) -> None:
        pass

    async def stats(self, timeout: float = 5.0) -> dict:
        return {"steps": 0, "requests_in_flight": 0, "workers_ready": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    def __init__(self, api_key_file: str = "", **settings) -> None:
        self.port = free_port()
        config = ServerConfig.from_settings(http_listen=f"127.0.0.1:{self.port}", api_key_file=api_key_file,
                                            scheduler_frontend_addr=f"tcp://127.0.0.1:{free_port()}", **settings)
        self.drain = Drain(timeout_s=1.0)
        self.server = FrontendServer(config, FakeTokenizer(), "m", self.drain)
        self.engine = FakeEngine()
        for name in ("add", "abort", "finish_outputs", "stats"):  # every part holds the same EngineClient
            setattr(self.server.engine, name, getattr(self.engine, name))
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Self:
        self.server.http.bind()
        self._task = asyncio.create_task(self.server.http.serve())
        await self.deliver(info())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.http.stop()
        self._task.cancel()
        self.server.close(0)

    async def deliver(self, msg: p.SchedulerMessage) -> None:
        await self.server._on_engine_message(msg)

    async def next_added(self) -> p.AddRequest:
        await asyncio.wait_for(self.engine.added_event.wait(), 5)
        self.engine.added_event.clear()
        return self.engine.added[-1]

    async def tokens(self, engine_id: str, text: str, index: int = 0, finish: str | None = None, **kw) -> None:
        ids = [ord(c) for c in text]
        await self.deliver(p.EngineOutputs(deltas=[p.TokenDelta(request_id=engine_id, index=index, token_ids=ids,
                                                                finish_reason=finish, **kw)]))

    async def open(self, method: str, path: str, body=None, key: str | None = KEY) -> tuple[asyncio.StreamReader,
                                                                                          asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        head = [f"{method} {path} HTTP/1.1", "host: test", "connection: close", f"content-length: {len(data)}"]
        if key:
            head.append(f"authorization: Bearer {key}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        return reader, writer

    async def http(self, method: str, path: str, body=None, key: str | None = KEY) -> Reply:
        reader, writer = await self.open(method, path, body, key)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return Reply.parse(raw)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @classmethod
    def parse(cls, raw: bytes) -> Reply:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            rest = dechunk(rest)
        return cls(int(lines[0].split()[1]), headers, rest)

    def json(self):
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The SSE events' data, in order (asserting the framing: `data: ...` lines, blank-line ends)."""
        text = self.body.decode()
        assert text.endswith("\n\n"), text
        events = text[:-2].split("\n\n")
        assert all(e.startswith("data: ") and "\n" not in e for e in events), events
        return [e[len("data: "):] for e in events]


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out
