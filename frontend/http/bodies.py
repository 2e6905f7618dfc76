"""The JSON bodies of POST /v1/completions and /v1/chat/completions, as msgspec Structs.

Decoding checks every type and names the field at fault (`$.messages[0].role` -> param
`messages[0].role`). Unknown fields are refused (as OpenAI does), except the ones clients
commonly send that change nothing here (`IGNORED`); fields we know but cannot honour are
declared, so frontend/http/translate.py can refuse them by name. docs/http.md lists all three.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import Struct

from frontend.http.errors import ApiError, bad_field
from shared.structured import StructuredOutputs

# Accepted and ignored (docs/http.md). logit_bias is accepted only empty (translate.py).
IGNORED = ("user", "service_tier", "store", "metadata", "parallel_tool_calls", "safety_identifier")


class _Body(Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class StreamOptions(_Body, kw_only=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: we add no padding fields to chunks


class _Sampling(_Body, kw_only=True):
    """The fields both endpoints share: OpenAI's, then vLLM's extras, then the ignored ones."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: Any = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    priority: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # beam search, as vLLM's extra body (shared/protocol.py SamplingParams; temperature defaults to 0 with
    # it; the completions endpoint's best_of is then the beam width)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # structured output: vLLM's object, or its older guided_* fields (frontend/http/structured.py)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    # routing affinity across engine replicas (docs/data_parallel.md): ours, else OpenAI's prompt_cache_key
    session_key: str | None = None
    prompt_cache_key: str | None = None
    # accepted, ignored (IGNORED)
    user: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None


class CompletionBody(_Sampling, kw_only=True):
    prompt: str | list[Any]  # a string, [string], [token ids] or [[token ids]]: translate.py
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False  # refused when true
    suffix: str | None = None  # refused when non-empty
    best_of: int | None = None  # refused when > n


class ContentPart(Struct, kw_only=True):
    """A part of a message's content: only {"type": "text", "text": ...} is served."""

    type: str
    text: str | None = None


class MessageIn(_Body, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # ignored: chat templates take no names
    # What an SDK sends back when a previous reply's message is replayed: accepted when empty.
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None


class ChatBody(_Sampling, kw_only=True):
    messages: list[MessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Known, not served: refused when set (translate.py).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None


_PATH = re.compile(r" - at `\$\.?(.*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def decode_body(raw: bytes, kind: type[_Body]) -> Any:
    """`raw` as a `kind`, or ApiError 400 naming the field (param) and what is wrong with it."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_request")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        raise _field_error(str(e)) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_request") from None


def _field_error(text: str) -> ApiError:
    """msgspec's "Expected `int`, got `str` - at `$.n`" -> param "n", message "n: expected ...";
    "Object contains unknown field `foo`" -> param "foo" (inside a nested object: its path)."""
    match = _PATH.search(text)
    where = match.group(1) if match else ""
    detail = text[:match.start()] if match else text
    unknown, missing = _UNKNOWN.search(detail), _MISSING.search(detail)
    if unknown or missing:
        name = (unknown or missing).group(1)
        name = f"{where}.{name}" if where else name
        what = (f"{name}: unknown field: this server does not take it (docs/http.md lists the fields it takes and "
                f"those it ignores)") if unknown else f"{name} is required"
        return bad_field(name, what)
    detail = f"{detail[0].lower()}{detail[1:]}"
    message = f"{where}: {detail}" if where else f"the request body: {detail}"
    return ApiError(400, message, param=where or None, code="invalid_request")
