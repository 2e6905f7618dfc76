"""The one request validator: used by the frontend before it sends a request, and by the
scheduler's admission (scheduler/admission.py) when it arrives.

Both run the same checks with the same messages, so a client gets the same answer
whichever process sees the problem first; the frontend knows the limits from the
scheduler's `EngineInfo`. A rejected request gets a typed `ErrorCode` and a message
naming the problem, so the client learns what to change. Everything admitted is
guaranteed to fit the KV cache on its own, which is what lets the policy promise
progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.protocol import ErrorCode, SamplingParams


class Rejected(Exception):
    """A request that cannot be served as asked: `code` for the client to branch on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """What any one sequence may use. Lengths in tokens, capacity in blocks."""

    max_model_len: int
    vocab_size: int
    num_device_blocks: int
    block_size: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True


def check_request(prompt_token_ids: list[int], params: SamplingParams, limits: Limits,
                  arrival_time: float = 0.0) -> int:
    """Validate a request; return its resolved max_tokens, or raise `Rejected`.

    Costs O(prompt length) (the token id range check)."""
    prompt_len = len(prompt_token_ids)
    if prompt_len == 0:
        raise Rejected(ErrorCode.INVALID_REQUEST, "prompt_token_ids is empty")
    check_token_ids(prompt_token_ids, limits.vocab_size)
    try:
        params.validate(limits.vocab_size)
    except ValueError as e:
        raise Rejected(ErrorCode.INVALID_REQUEST, str(e)) from None
    if not math.isfinite(arrival_time):
        raise Rejected(ErrorCode.INVALID_REQUEST, f"arrival_time must be finite, got {arrival_time}")

    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = limits.max_model_len - prompt_len
        if max_tokens < 1:
            raise Rejected(
                ErrorCode.TOO_LONG,
                f"prompt of {prompt_len} tokens leaves no room to generate within max_model_len={limits.max_model_len}",
            )
    total = prompt_len + max_tokens
    if total > limits.max_model_len:
        raise Rejected(
            ErrorCode.TOO_LONG,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
            f"max_model_len={limits.max_model_len}",
        )
    blocks = -(-total // limits.block_size)
    if blocks > limits.num_device_blocks:
        raise Rejected(
            ErrorCode.TOO_LONG,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks of "
            f"{limits.block_size} tokens; the cache has {limits.num_device_blocks}",
        )
    # Beam search: every beam may have to be recomputed alone (a parked group, no prefix cache), so
    # the group must fit as if nothing were shared; sharing only ever uses less.
    width = params.beam_width if params.use_beam_search else 1
    if width * blocks > limits.num_device_blocks:
        raise Rejected(
            ErrorCode.TOO_LONG,
            f"beam search with {width} beams of prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs up to "
            f"{width * blocks} KV blocks of {limits.block_size} tokens; the cache has {limits.num_device_blocks}",
        )
    # Without chunked prefill a sequence recomputed after a preemption just
    # before its last token prefills total - 1 tokens in one step.
    if not limits.enable_chunked_prefill and total - 1 > limits.max_num_batched_tokens:
        raise Rejected(
            ErrorCode.TOO_LONG,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) may need a prefill of {total - 1} "
            f"tokens, over max_num_batched_tokens={limits.max_num_batched_tokens}",
        )
    return max_tokens


def check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    lowest, highest = min(token_ids), max(token_ids)
    if lowest >= 0 and highest < vocab_size:
        return
    bad_index, bad = next((i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab_size)
    raise Rejected(
        ErrorCode.INVALID_REQUEST,
        f"prompt_token_ids[{bad_index}] = {bad} is outside the vocabulary [0, {vocab_size})",
    )


def stop_token_ids(params: SamplingParams, eos_token_ids) -> set[int]:
    """The token ids that end an output: its stop_token_ids, plus EOS unless ignore_eos.
    The scheduler (finish) and the worker (min_tokens masking) both use this one set."""
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= set(eos_token_ids)
    return stop_ids
