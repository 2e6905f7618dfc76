"""OpenAI's response objects, as msgspec Structs encoded by msgspec.json.

Fields are OpenAI's, in OpenAI's order; `None` is sent as null where OpenAI sends null
(`finish_reason` of a chunk, `logprobs` not asked for). `usage` on a chunk is UNSET (left out)
unless the client asked for `stream_options.include_usage`, when it is null on every chunk but
the last, as OpenAI sends it.
"""

from __future__ import annotations

from msgspec import UNSET, Struct, UnsetType


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# -- logprobs --------------------------------------------------------------------------------

class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob]
    refusal: None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


# -- /v1/completions ---------------------------------------------------------------------------

class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(Struct):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: str = "text_completion"
    usage: Usage | None | UnsetType = UNSET


# -- /v1/chat/completions ----------------------------------------------------------------------

class ChatMessageOut(Struct):
    content: str
    role: str = "assistant"
    refusal: None = None


class ChatChoice(Struct):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatResponse(Struct):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    usage: Usage
    object: str = "chat.completion"


class ChatDelta(Struct, omit_defaults=True):
    """A chunk's delta: the role on an output's first chunk only, content when there is text."""

    role: str | None = None
    content: str | None = None


class ChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunk(Struct):
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: str = "chat.completion.chunk"
    usage: Usage | None | UnsetType = UNSET


# -- /v1/models --------------------------------------------------------------------------------

class ModelCard(Struct):
    id: str
    created: int
    max_model_len: int | None
    object: str = "model"
    owned_by: str = "pagedserve"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class HealthBody(Struct, omit_defaults=True):
    status: str  # ok | starting | draining | unavailable | degraded | stalled
    detail: str = ""

