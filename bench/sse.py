"""Server-sent events of an OpenAI-compatible streaming completion, decoded without I/O.

What vLLM's `POST /v1/completions` with `stream: true` and `stream_options.include_usage`
sends (llama-server and OpenAI send the same shape):

    data: {"choices": [{"index": 0, "text": " Hello", "finish_reason": null}], "usage": null}

    data: {"choices": [{"index": 0, "text": "!", "finish_reason": "length"}], "usage": null}

    data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}

    data: [DONE]

Errors come as a JSON error object (`{"error": {"message": ...}}`, or vLLM's older top-level
`{"object": "error", "message": ...}`), in a `data:` line or in an `event: error` event
(llama-server writes `error: {...}`).
"""

from __future__ import annotations

import json

from bench.arrivals import RequestFailed


class SSEDecoder:
    """Bytes as they arrive -> complete events as (event type, data). Events end at a blank line;
    several `data:` lines of one event are joined with newlines (the SSE spec); comments (`:`) and
    `id:`/`retry:` fields are dropped."""

    def __init__(self):
        self._buffer = b""
        self._event = "message"
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if self._data:
                    events.append((self._event, "\n".join(self._data)))
                self._event, self._data = "message", []
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value
            elif field == "error":  # llama-server's `error: {...}` line: an error event of its own
                events.append(("error", value))
        return events

    def close(self) -> list[tuple[str, str]]:
        """Whatever the stream held when it ended (an event with no blank line after it)."""
        return self.feed(b"\n\n") if self._buffer or self._data else []


def error_message(payload) -> str | None:
    """The message of an OpenAI-style error object, or None when `payload` is not one."""
    if not isinstance(payload, dict):
        return None
    if "error" in payload:
        error = payload["error"]
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            return f"{error.get('message', error)}" + (f" ({code})" if code else "")
        return str(error)
    if payload.get("object") == "error":
        return f"{payload.get('message', payload)}" + (f" ({payload['code']})" if payload.get("code") else "")
    return None


def _tokens_in(choice: dict) -> int:
    """Tokens a chunk carries: the ids or logprobs when the server sends them (several tokens can
    arrive in one chunk), else one per chunk with text, as `vllm bench serve` counts them."""
    if isinstance(choice.get("token_ids"), list):
        return len(choice["token_ids"])
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


class CompletionStream:
    """The state of one streamed completion: `event()` each decoded event, in order."""

    def __init__(self):
        self.done = False  # `data: [DONE]` seen
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None  # from the usage chunk
        self.chunks = 0  # JSON chunks seen

    def event(self, kind: str, data: str) -> int:
        """-> output tokens this event carries (0 for usage, [DONE], empty text); raises RequestFailed
        on an error event or error object."""
        if data.strip() == "[DONE]":
            self.done = True
            return 0
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            raise RequestFailed(f"the stream sent something that is not JSON: {data[:200]!r}") from None
        message = error_message(payload)
        if kind == "error" or message is not None:
            raise RequestFailed(f"the server sent an error in the stream: {message or data[:200]}")
        self.chunks += 1
        usage = payload.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.completion_tokens = int(usage["completion_tokens"])
        tokens = 0
        for choice in payload.get("choices") or []:
            tokens += _tokens_in(choice)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return tokens

    @property
    def complete(self) -> bool:
        """[DONE] arrived, or a finish reason did (servers that end the stream without [DONE])."""
        return self.done or self.finish_reason is not None
