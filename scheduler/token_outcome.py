"""What one sampled token means for its sequence and its delta: does it end the output, and
what rides on the delta (logprobs, the first token's queue and prefill times). Pure functions
of the scheduler's state: `Scheduler.update` calls them for every token it appends."""

from __future__ import annotations

from scheduler.grammar_masks import accept
from scheduler.sequence import Request, Sequence
from shared.protocol import FinishReason, StepResult, TokenDelta

_STOP = FinishReason.STOP.value
_LENGTH = FinishReason.LENGTH.value
_ERROR = FinishReason.ERROR.value


def finish_reason(seq: Sequence, token: int, max_model_len: int) -> str | None:
    """Checked after appending `token` to `seq` (its grammar, if any, moves over it here). EOS
    and stop ids end it only from generated token number min_tokens on (0-based): the worker
    masks them before that. A grammar that can go no further ends it with "stop"."""
    reason = None
    if token in seq.request.stop_token_ids and seq.num_output_tokens > seq.request.params.min_tokens:
        reason = _STOP
    elif seq.num_output_tokens >= seq.request.max_tokens or seq.num_tokens >= max_model_len:
        reason = _LENGTH
    if seq.grammar is not None:
        verdict = accept(seq, token)
        if verdict == "rejected":
            return _ERROR
        if verdict == "done" and reason is None:
            return _STOP
    return reason


def append_tokens(seq: Sequence, delta: TokenDelta, tokens: list[int], max_model_len: int) -> str | None:
    """Append `tokens` (one step's: several when proposals were accepted) to `seq` and `delta`, one
    at a time, each checked by `finish_reason`; stops at the first that finishes the output (none
    past a stop is emitted) and returns its reason, else None. A speculating sequence's delta
    carries its speculation totals so far (the frontend keeps the latest per output)."""
    if seq.spec_proposed:
        delta.spec_proposed, delta.spec_accepted = seq.spec_proposed, seq.spec_accepted
    for token in tokens:
        seq.token_ids.append(token)
        delta.token_ids.append(token)
        reason = finish_reason(seq, token, max_model_len)
        if reason is not None:
            return reason
    return None


def time_first_token(request: Request, delta: TokenDelta, now: float) -> None:
    """`delta` carries `request`'s first token (at `now`, the scheduler's clock): it reports the
    queue and prefill times."""
    request.first_token_at = now
    scheduled = request.first_scheduled_at if request.first_scheduled_at is not None else now
    delta.queue_time_s = round(max(0.0, scheduled - request.received_at), 6)
    delta.prefill_time_s = round(max(0.0, now - scheduled), 6)


def attach_logprobs(delta: TokenDelta, result: StepResult, i: int) -> None:
    """Copy row `i`'s logprobs (if the worker sent any) onto its delta."""
    if result.logprobs and result.logprobs[i] is not None:
        delta.logprobs = [result.logprobs[i]]
        if result.extra_logprobs and result.extra_logprobs[i]:  # accepted proposals' (and the next token's)
            delta.logprobs += [lp for lp in result.extra_logprobs[i][:len(delta.token_ids) - 1] if lp is not None]
    if result.prompt_logprobs and result.prompt_logprobs[i]:
        delta.prompt_logprobs = result.prompt_logprobs[i]
