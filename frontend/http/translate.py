"""An OpenAI request body -> the `Generate` a ZeroMQ client would have sent for it.

Only the mapping lives here: the values themselves are checked by the frontend's one validator
(Intake -> shared/validation.py), so a bad temperature gets the same message on both paths.
Fields we cannot honour are refused here, by name, before anything is queued.
"""

from __future__ import annotations

from frontend.http.bodies import ChatBody, CompletionBody, _Sampling
from frontend.http.errors import bad_field, model_not_found
from frontend.http.structured import structured_outputs
from shared import protocol as p

SESSION_KEY_MAX_CHARS = 256  # SamplingParams.session_key's bound on the wire (shared/protocol.py)


def completion_generate(body: CompletionBody, request_id: str, served_model: str) -> p.Generate:
    _check_common(body, served_model)
    if body.echo:
        raise bad_field("echo", "echo is not supported: the reply holds the generated text only")
    if body.suffix:
        raise bad_field("suffix", "suffix is not supported: this server does not fill in the middle")
    if body.best_of is not None and body.best_of > body.n and not body.use_beam_search:
        raise bad_field("best_of", f"best_of ({body.best_of}) > n ({body.n}) is not supported: ask for n "
                                   f"completions and choose among them")
    prompt, token_ids = _prompt(body.prompt)
    params = _params(body, body.max_tokens, body.logprobs)
    return p.Generate(request_id=request_id, params=params, prompt=prompt, prompt_token_ids=token_ids,
                      stream=body.stream, priority=body.priority)


def chat_generate(body: ChatBody, request_id: str, served_model: str) -> p.Generate:
    _check_common(body, served_model)
    for name in ("tools", "functions", "function_call", "audio", "prediction", "reasoning_effort",
                 "web_search_options"):
        if getattr(body, name):
            raise bad_field(name, f"{name} is not supported by this server")
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_field("tool_choice", "tool_choice is not supported by this server (no tools)")
    if body.modalities and body.modalities != ["text"]:
        raise bad_field("modalities", "only the text modality is served")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_field("top_logprobs", "top_logprobs needs logprobs: true")
    messages = [_message(i, m) for i, m in enumerate(body.messages)]
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, max_tokens, logprobs)
    return p.Generate(request_id=request_id, params=params, messages=messages, stream=body.stream,
                      priority=body.priority)


def _check_common(body: _Sampling, served_model: str) -> None:
    if body.model is not None and body.model != served_model:
        raise model_not_found(body.model)
    if body.logit_bias:
        raise bad_field("logit_bias", "logit_bias is not supported (only an empty one is accepted)")
    if body.stream_options is not None and not body.stream:
        raise bad_field("stream_options", "stream_options needs stream: true")


def _params(body: _Sampling, max_tokens: int | None, logprobs: int | None) -> p.SamplingParams:
    """Fields left out keep SamplingParams' defaults (OpenAI's and vLLM's: temperature 1, top_p 1)."""
    given = {name: getattr(body, name) for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                                    "top_k", "min_p", "repetition_penalty", "seed")}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if body.use_beam_search and body.temperature is None:
        given["temperature"] = 0.0  # beam search does not sample: only temperature 0 is valid with it
    best_of = getattr(body, "best_of", None) if body.use_beam_search else None  # the beam width
    return p.SamplingParams(session_key=_session_key(body),use_beam_search=body.use_beam_search, best_of=best_of,
                            length_penalty=body.length_penalty, early_stopping=body.early_stopping,
                            n=body.n, max_tokens=max_tokens, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
                            ignore_eos=body.ignore_eos, min_tokens=body.min_tokens, logprobs=logprobs,
                            skip_special_tokens=body.skip_special_tokens,
                            include_stop_str_in_output=body.include_stop_str_in_output,
                            structured_outputs=structured_outputs(body),
                            **{k: v for k, v in given.items() if v is not None})


def _session_key(body: _Sampling) -> str:
    """`session_key`, else OpenAI's `prompt_cache_key` (its name for the same hint): requests with one key
    go to the replica that served the last of them while its load allows (frontend/router.py)."""
    key = body.session_key if body.session_key is not None else body.prompt_cache_key
    field = "session_key" if body.session_key is not None else "prompt_cache_key"
    if key is not None and len(key) > SESSION_KEY_MAX_CHARS:
        raise bad_field(field, f"{field} is longer than {SESSION_KEY_MAX_CHARS} characters")
    return key or ""


def _prompt(prompt: str | list) -> tuple[str | None, list[int] | None]:
    """One prompt: a string, a list of one string, token ids, or a list of one list of token ids."""
    if isinstance(prompt, str):
        return prompt, None
    if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt, None
    if prompt and all(type(t) is int for t in prompt):  # bool is an int subclass: not a token id
        return None, prompt
    if len(prompt) > 1 and all(isinstance(x, (str, list)) for x in prompt):
        raise bad_field("prompt", "one prompt per request: send the others in requests of their own")
    raise bad_field("prompt", "prompt must be a string, a list of one string, or a list of token ids")


def _message(i: int, m) -> p.ChatMessage:
    if m.tool_calls:
        raise bad_field(f"messages[{i}].tool_calls", "tool calls are not supported by this server")
    if m.content is None or isinstance(m.content, str):
        return p.ChatMessage(role=m.role, content=m.content or "")
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise bad_field(f"messages[{i}].content[{j}].type", f"content of type {part.type!r} is not supported: "
                                                                f"only text")
        texts.append(part.text)
    return p.ChatMessage(role=m.role, content="\n".join(texts))  # as vLLM joins text parts
