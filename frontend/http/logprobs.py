"""Our `TokenLogprobs` (ids) -> OpenAI's logprobs objects (token strings).

A token's string is its own decoding, special tokens included (as vLLM's); `bytes` are that
string's UTF-8 bytes (a token that is part of a multi-byte character decodes to U+FFFD, as it
does in vLLM). Decoding is done only for requests that ask for logprobs, once per distinct id.
"""

from __future__ import annotations

from collections.abc import Callable

from frontend.http.shapes import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)
from shared.protocol import TokenLogprobs


class TokenTexts:
    """Token id -> its string. The cache holds at most one entry per vocabulary id, so it is
    bounded by the vocabulary's size."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._decode([token_id])
        return text


def chat_logprobs(entries: list[TokenLogprobs], texts: TokenTexts) -> ChatLogprobs:
    """choices[].logprobs of a chat reply or chunk: one entry per generated token."""
    content = []
    for e in entries:
        token = texts(e.token_id)
        top = [TopLogprob(texts(i), lp, list(texts(i).encode())) for i, lp in zip(e.top_ids, e.top_logprobs)]
        content.append(ChatTokenLogprob(token, e.logprob, list(token.encode()), top))
    return ChatLogprobs(content)


def completion_logprobs(entries: list[TokenLogprobs], texts: TokenTexts, offset: int) -> CompletionLogprobs:
    """choices[].logprobs of a completion reply or chunk. `offset`: characters of this output's
    text before these tokens (text_offset counts from the start of the generated text).
    top_logprobs holds the chosen token as well as the k most likely (as vLLM's)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        token = texts(e.token_id)
        tokens.append(token)
        token_logprobs.append(e.logprob)
        top = {texts(i): lp for i, lp in zip(e.top_ids, e.top_logprobs)}
        top.setdefault(token, e.logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, text_offset)

