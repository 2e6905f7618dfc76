"""Our replies (`Delta`, `Completion`) -> the bytes of OpenAI's responses, for one request.

A renderer per request holds what its chunks share (id, created, model) and what carries from
chunk to chunk (whether output i has had its role chunk; each output's text_offset). Per token
it builds one small Struct and encodes it once: `chunk` returns a whole SSE event, or b"" for a
delta that has nothing to tell.
"""

from __future__ import annotations

import msgspec

from frontend.http.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from frontend.http.shapes import (
    ChatChoice,
    ChatChunk,
    ChatDelta,
    ChatMessageOut,
    ChatResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from shared import protocol as p

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def sse(body: bytes) -> bytes:
    """One server-sent event. msgspec's JSON has no raw newlines, so one `data:` line holds it."""
    return b"data: " + body + b"\n\n"


def _empty(d: p.Delta) -> bool:
    """Nothing to tell the client: no text (the detokenizer may hold text back while it could
    still be the start of a stop string), no logprobs, not the end. Such a delta sends no chunk."""
    return not d.text and d.finish_reason is None and not d.logprobs


def usage_of(c: p.Completion) -> Usage:
    return Usage(c.prompt_tokens, c.completion_tokens, c.prompt_tokens + c.completion_tokens)


class _Renderer:
    """`n`: the request's outputs; `include_usage`: stream_options.include_usage."""

    def __init__(self, request_id: str, created: int, model: str, texts: TokenTexts, n: int,
                 include_usage: bool) -> None:
        self.request_id, self.created, self.model = request_id, created, model
        self._texts = texts
        self._n = n
        self.include_usage = include_usage
        # OpenAI's chunks carry "usage": null when usage was asked for, and no usage key otherwise.
        self._chunk_usage = None if include_usage else msgspec.UNSET


class ChatRenderer(_Renderer):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._role_sent = [False] * self._n

    def chunk(self, d: p.Delta) -> bytes:
        role = None
        if _empty(d) and self._role_sent[d.index]:
            return b""
        if not self._role_sent[d.index]:
            self._role_sent[d.index] = True
            role = "assistant"
        logprobs = chat_logprobs(d.logprobs, self._texts) if d.logprobs is not None else None
        choice = ChunkChoice(d.index, ChatDelta(role, d.text if d.text or role else None), logprobs, d.finish_reason)
        return sse(_encode(ChatChunk(self.request_id, [choice], self.created, self.model,
                                     usage=self._chunk_usage)))

    def usage_chunk(self, c: p.Completion) -> bytes:
        return sse(_encode(ChatChunk(self.request_id, [], self.created, self.model, usage=usage_of(c))))

    def response(self, c: p.Completion) -> bytes:
        choices = [ChatChoice(o.index, ChatMessageOut(o.text),
                              chat_logprobs(o.logprobs, self._texts) if o.logprobs is not None else None,
                              o.finish_reason) for o in c.outputs]
        return _encode(ChatResponse(self.request_id, choices, self.created, self.model, usage_of(c)))


class CompletionRenderer(_Renderer):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._offsets = [0] * self._n  # characters of each output's token strings sent so far (text_offset)

    def chunk(self, d: p.Delta) -> bytes:
        if _empty(d):
            return b""
        logprobs = None
        if d.logprobs is not None:
            logprobs = completion_logprobs(d.logprobs, self._texts, self._offsets[d.index])
            if logprobs.tokens:
                self._offsets[d.index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        choice = CompletionChoice(d.index, d.text, logprobs, d.finish_reason)
        return sse(_encode(CompletionResponse(self.request_id, [choice], self.created, self.model,
                                              usage=self._chunk_usage)))

    def usage_chunk(self, c: p.Completion) -> bytes:
        return sse(_encode(CompletionResponse(self.request_id, [], self.created, self.model, usage=usage_of(c))))

    def response(self, c: p.Completion) -> bytes:
        choices = [CompletionChoice(o.index, o.text,
                                    completion_logprobs(o.logprobs, self._texts, 0) if o.logprobs is not None
                                    else None, o.finish_reason) for o in c.outputs]
        return _encode(CompletionResponse(self.request_id, choices, self.created, self.model, usage=usage_of(c)))
