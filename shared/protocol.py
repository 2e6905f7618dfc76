"""Every message that crosses a socket in pagedserve, and nothing else.

Three sockets, three unions, one `Decoder` each (see `decoder_for`):

* client  <-> frontend   : `ClientMessage`    / `ServerMessage`
* frontend <-> scheduler : `FrontendMessage`  / `SchedulerMessage`
* scheduler <-> worker   : `PlanMessage`      / `WorkerMessage`

Conventions
-----------
* Internal messages are ``array_like=True, omit_defaults=True`` (compact, fixed
  field order: append new fields at the end with defaults).
* Messages on the client socket are encoded as maps and forbid unknown fields,
  so a validation error names the offending field (``$.params.max_tokens``) and
  an SDK built against a newer protocol fails loudly instead of silently.
* Token ids are ``list[int]``, never tensors. No pickle, ever.
* Units: lengths are in tokens unless a name says ``blocks`` or ``bytes``;
  times are seconds (float) since the Unix epoch unless named ``*_s`` (durations).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct, field

from shared.structured import StructuredOutputs

# The internal sockets' protocol (frontend <-> scheduler <-> worker). Bumped when a message
# changes meaning; each hello carries it, and the scheduler refuses a peer of another version
# with a message naming both (a frontend or worker left running across an upgrade).
# 2: stop-string finishes moved from AbortRequests to FinishOutputs.
# 3: structured output (TokenizerInfo, EngineInfo.needs_tokenizer, StepPlan.masked_rows, StepMasks).
# 4 (beam search): SamplingParams.use_beam_search/best_of/length_penalty/early_stopping,
#   ScheduledSeq.num_candidates/append_token_ids, StepResult.candidates, TokenDelta.cumulative_logprob/beam_score.
#   Data parallelism: SamplingParams.session_key, KvEvents (scheduler -> frontend: prefix-cache keys
#   stored/evicted and load, every 0.1 s), KvSnapshotQuery (frontend -> scheduler, after a gap).
# 5 (speculative decoding): ScheduledSeq.spec_token_ids/block_table_len, StepResult.extra_tokens/extra_logprobs.
# 6 (draft-model speculation): ScheduledSeq.num_draft_tokens; TokenDelta.spec_proposed/spec_accepted.
# 7: StepMasks also holds a mask per speculative proposal of a masked row (grammar rows speculate).
PROTOCOL_VERSION = 7

# Bounds on untrusted sizes. The frame itself is bounded by ZMQ_MAXMSGSIZE (shared/ipc.py).
MAX_PROMPT_TOKENS = 1 << 20
MAX_TEXT_CHARS = 1 << 24
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 256
MAX_N = 64
MAX_LOGPROBS = 20  # top-k logprobs per token at most (vLLM's default max_logprobs)
MAX_BEAM_WIDTH = 16  # beams per request at most: the worker returns (1 + stop ids) * width candidates per beam
GREEDY_TEMPERATURE = 1e-5  # a temperature below this samples greedily (as vLLM: dividing by it overflows)

RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
TokenIds = Annotated[list[int], Meta(max_length=MAX_PROMPT_TOKENS)]


class ErrorCode(str, enum.Enum):
    """`RequestError.code` values. Stable strings: clients branch on them."""

    INVALID_REQUEST = "invalid_request"  # malformed or out-of-range input
    TOO_LONG = "too_long"  # prompt + max_tokens cannot fit max_model_len or the KV cache
    OVERLOADED = "overloaded"  # a bounded queue is full: retry later
    UNAVAILABLE = "unavailable"  # the server (or a part of it) cannot be reached
    SHUTTING_DOWN = "shutting_down"  # the server is draining
    NOT_FOUND = "not_found"  # abort of an unknown request id
    INTERNAL = "internal"  # a bug: logged with the request id


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the client, a disconnect or a shutdown
    ERROR = "error"  # the server failed this request


# --------------------------------------------------------------------------
# Sampling parameters (vLLM's names and meanings)
# --------------------------------------------------------------------------


class SamplingParams(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """How to generate. Names and meanings follow vLLM's SamplingParams.

    Construction never raises: a bad value is reported by the server as a
    `RequestError` with code ``invalid_request`` (see `validate`).
    """

    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # >1 discourages tokens of the prompt or the output (CTRL)
    min_tokens: int = 0  # EOS and stop_token_ids / stop strings cannot end the output before this many tokens
    logprobs: int | None = None  # top-k log-probabilities per generated token, plus the chosen token's
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # Tokens must match this JSON Schema, regex, choice or grammar (shared/structured.py).
    structured_outputs: StructuredOutputs | None = None
    # Beam search (docs/architecture.md, "Beam search"): `best_of` beams (default n) and the n best
    # finished hypotheses returned, best first, as transformers' generate(num_beams=best_of,
    # num_return_sequences=n, do_sample=False). A hypothesis scores sum(logprobs) / len ** length_penalty,
    # len its generated tokens (EOS included). early_stopping: True stops once best_of hypotheses are
    # done; False stops when the best running beam cannot beat the worst kept hypothesis at its
    # current length; "never" at the longest possible length when length_penalty > 0.
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # Data parallelism (docs/data_parallel.md): requests with the same key go to the same engine
    # replica while it is up and not overloaded (its prefix cache then holds their shared context).
    session_key: Annotated[str, Meta(max_length=256)] = ""

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field. Each field is checked on its own first;
        relations between fields (min_tokens <= max_tokens) only once both are valid, so the
        message names the field the caller actually got wrong."""
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError("seed must fit in a signed 64-bit integer")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self._validate_other_fields()
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.structured_outputs is not None:
            try:
                self.structured_outputs.validate()
            except ValueError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        if self.use_beam_search:
            self._validate_beam_search()
        elif self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is the beam width: it needs use_beam_search")

    def _validate_beam_search(self) -> None:
        """Beam search is deterministic and ranks whole hypotheses: what samples, reshapes the
        distribution, streams per token or ends an output by text has no meaning in it."""
        width = self.beam_width
        if not self.n <= width <= MAX_BEAM_WIDTH:
            raise ValueError(f"best_of (the beam width) must be in [n, {MAX_BEAM_WIDTH}], got {width} with n={self.n}")
        if not -10.0 <= self.length_penalty <= 10.0:
            raise ValueError(f"length_penalty must be in [-10, 10], got {self.length_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f'early_stopping must be true, false or "never", got {self.early_stopping!r}')
        if not self.greedy:
            raise ValueError("use_beam_search needs temperature 0 (beam search does not sample)")
        incompatible = [name for name, bad in (
            ("top_p", self.top_p != 1.0), ("top_k", self.top_k not in (0, -1)), ("min_p", self.min_p != 0.0),
            ("presence_penalty", self.presence_penalty != 0.0), ("frequency_penalty", self.frequency_penalty != 0.0),
            ("repetition_penalty", self.repetition_penalty != 1.0), ("min_tokens", self.min_tokens != 0),
            ("logprobs", self.logprobs is not None), ("prompt_logprobs", self.prompt_logprobs is not None),
            ("stop", bool(self.stop)), ("structured_outputs", self.structured_outputs is not None)) if bad]
        if incompatible:
            raise ValueError(f"use_beam_search cannot be combined with {', '.join(incompatible)}")

    @property
    def beam_width(self) -> int:
        """Beams kept per step: best_of, or n when unset."""
        return self.best_of if self.best_of is not None else self.n

    def _validate_other_fields(self) -> None:
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be None or in [0, {MAX_LOGPROBS}], got {value}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class TokenLogprobs(Struct, array_like=True, forbid_unknown_fields=True):
    """Log-probabilities (natural log, float32 precision) at one position, from the model's raw
    distribution (before penalties, temperature and filters, as vLLM's default).

    `token_id`/`logprob`/`rank` are the chosen token's (sampled, or the prompt's own); rank 1 is
    the most likely. `top_ids`/`top_logprobs` are the `logprobs` most likely tokens, best first
    (the chosen token may be among them). Array-like, unlike other client structs, because it
    repeats once per token: field names would double its size.
    """

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------
# client <-> frontend (map-encoded, unknown fields rejected)
# --------------------------------------------------------------------------


class _ClientStruct(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True, tag_field="kind"):
    pass


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]


class Generate(_ClientStruct, tag="generate"):
    """Exactly one of prompt, messages, prompt_token_ids is set."""

    request_id: RequestId
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)] | None = None
    messages: list[ChatMessage] | None = None
    prompt_token_ids: TokenIds | None = None
    stream: bool = False
    priority: int = 0  # lower runs first
    # A W3C trace context header, "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>": the trace id
    # goes on every event of this request (docs/metrics.md). Not bounded or checked here: a malformed
    # one is ignored with a warning by the frontend (frontend/metrics_trace.py), never an error.
    traceparent: str | None = None


class Abort(_ClientStruct, tag="abort"):
    request_id: RequestId


class HealthCheck(_ClientStruct, tag="health"):
    request_id: RequestId


class GetStats(_ClientStruct, tag="stats"):
    request_id: RequestId


ClientMessage = Union[Generate, Abort, HealthCheck, GetStats]


class Delta(_ClientStruct, tag="delta"):
    """A streamed piece of output `index`: new text and the token ids behind it."""

    request_id: str
    text: str
    token_ids: list[int]
    index: int = 0
    finish_reason: str | None = None  # set on the last delta of output `index`
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when params.logprobs is set


class CompletionOutput(Struct, kw_only=True, forbid_unknown_fields=True):
    index: int
    text: str
    token_ids: list[int]  # generated ids only
    finish_reason: str  # a FinishReason value
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when params.logprobs is set
    # Beam search only: the hypothesis' sum of token logprobs (natural log) and its score
    # (that sum / generated tokens ** length_penalty, what outputs are ranked by).
    cumulative_logprob: float | None = None
    beam_score: float | None = None


class Completion(_ClientStruct, tag="completion"):
    """The final answer: one output per `n`. Timings are durations in seconds."""

    request_id: str
    outputs: list[CompletionOutput]
    prompt_tokens: int
    completion_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0  # frontend receipt -> first generated token
    latency_s: float = 0.0  # frontend receipt -> completion
    num_preemptions: int = 0
    # One per prompt token when params.prompt_logprobs is set; the first is None (nothing predicts it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


class ErrorReply(_ClientStruct, tag="error"):
    """Raised by the SDK as `RequestError(code, message)`."""

    request_id: str
    code: str  # an ErrorCode value
    message: str


class HealthReply(_ClientStruct, tag="health"):
    request_id: str
    status: str  # "ok" | "starting" | "draining" | "degraded"
    model: str = ""
    workers_ready: int = 0
    workers_expected: int = 0


class StatsReply(_ClientStruct, tag="stats"):
    request_id: str
    stats: dict[str, Any]


class KeepAlive(_ClientStruct, tag="keepalive"):
    """Sent by the frontend about once a second to every client with requests in flight; the SDK
    drops it. It exists for its send: a ROUTER learns that a client went away only when a send
    to it fails, so this is how a disconnected non-streaming client's requests get aborted."""

    request_id: str = ""


ServerMessage = Union[Delta, Completion, ErrorReply, HealthReply, StatsReply, KeepAlive]


# --------------------------------------------------------------------------
# frontend <-> scheduler (internal, array-like)
# --------------------------------------------------------------------------


class _Internal(Struct, array_like=True, omit_defaults=True, tag=True):
    pass


class FrontendHello(_Internal, tag="fe_hello"):
    """Sent every second: asks for `EngineInfo`. It doubles as the heartbeat both ways: the
    scheduler aborts the requests of a frontend silent for long, and the frontend learns from
    `EngineInfo.scheduler_id` that the scheduler restarted."""

    frontend_id: str
    protocol_version: int = 1  # absent in frames of version 1, which had no such field


class AddRequest(_Internal, tag="add"):
    """A request, or (after a scheduler restart) the rest of one: `output_token_ids[i]` are the
    tokens output i already generated and streamed (the new scheduler continues after them:
    they count towards max_tokens and seeded sampling's token index), and `finished_outputs`
    are outputs that ended already. Resubmissions use a new request id (see frontend/resubmit.py)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    output_token_ids: list[list[int]] = field(default_factory=list)
    finished_outputs: list[int] = field(default_factory=list)
    trace_id: str = ""  # 32 hex digits from the client's traceparent (checked by the frontend), or ""


class AbortRequests(_Internal, tag="abort"):
    """Abort whole requests: each unfinished output ends with reason "abort"."""

    request_ids: list[str]


class FinishOutputs(_Internal, tag="finish_outputs"):
    """Finish single outputs, as (request id, output index) pairs, with reason "stop": the
    frontend matched a stop string in one of n outputs, so its blocks are freed now."""

    outputs: list[tuple[str, int]]


class StatsQuery(_Internal, tag="stats_q"):
    query_id: str


class TokenizerInfo(_Internal, tag="tokenizer"):
    """The tokenizer, as Hugging Face `tokenizers` JSON: sent once per scheduler process, when its
    `EngineInfo.needs_tokenizer` asks, so the scheduler can compile grammars over the model's
    tokens (llguidance reads this JSON itself: the scheduler never imports transformers)."""

    tokenizer_json: str


class KvSnapshotQuery(_Internal, tag="kv_snap_q"):
    """The frontend missed a `KvEvents` (a gap in `seq`): the scheduler answers with a snapshot."""


FrontendMessage = Union[FrontendHello, AddRequest, AbortRequests, FinishOutputs, StatsQuery, TokenizerInfo,
                        KvSnapshotQuery]


class EngineInfo(_Internal, tag="engine_info"):
    """What the frontend must know to validate requests. ready=False: no worker yet."""

    ready: bool
    model: str = ""
    max_model_len: int = 0  # tokens
    vocab_size: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    block_size: int = 0  # tokens per KV block
    num_device_blocks: int = 0
    workers_ready: int = 0
    workers_expected: int = 0
    scheduler_id: str = ""  # one per scheduler process: a new one means its state is gone
    # Times this scheduler declared the receiving frontend gone (silent, or unreachable) and aborted
    # its requests: a change tells a frontend that was only paused to resubmit what it holds.
    frontend_drops: int = 0
    # The scheduler's own limits, so the frontend validates exactly as admission does
    # (shared/validation.py).
    max_num_batched_tokens: int = 0  # tokens per step
    enable_chunked_prefill: bool = True
    # Set when the scheduler refuses this frontend: its protocol version is not ours.
    refusal: str = ""
    kv_cache_bytes: int = 0  # one worker's KV cache (rank 0's; every rank holds the same share)
    needs_tokenizer: bool = False  # no frontend has sent `TokenizerInfo` to this scheduler yet


class TokenDelta(_Internal, tag="td"):
    """New tokens of output `index` of a request. finish_reason set on its last delta."""

    request_id: str
    index: int
    token_ids: list[int]
    finish_reason: str | None = None
    num_preemptions: int = 0  # set on the finishing delta
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, if requested
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.., on the first delta
    # On the delta with the request's first generated token (any output), by the scheduler's clock:
    # queue_time_s from its receipt of the request to its first scheduling, prefill_time_s from
    # then to that first token. None on every other delta.
    queue_time_s: float | None = None
    prefill_time_s: float | None = None
    # Beam search: a finished hypothesis comes whole on one delta, with its sum of logprobs and score,
    # and (on index 0) the request's KV figures: {"beam_kv_blocks_shared": ..., "beam_kv_blocks_unshared": ...}
    # summed over its steps (blocks its beams held, and what a copy per beam would have held).
    cumulative_logprob: float | None = None
    beam_score: float | None = None
    beam_stats: dict[str, int] = field(default_factory=dict)
    # Speculative decoding, on every delta of an output that has speculated: the tokens it proposed
    # and accepted so far (totals; the frontend keeps the latest for request.finished).
    spec_proposed: int = 0
    spec_accepted: int = 0


class EngineOutputs(_Internal, tag="outputs"):
    deltas: list[TokenDelta]


class RequestRejected(_Internal, tag="rejected"):
    request_id: str
    code: str  # an ErrorCode value
    message: str


class StatsResult(_Internal, tag="stats_r"):
    query_id: str
    stats: dict[str, Any]


class KvEvents(_Internal, tag="kv"):
    """Sent to every frontend at least every 0.1 s (scheduler/kv_events.py): which prefix-cache keys
    (`shared/block_hash.route_key`) were stored and evicted since the previous message, and the load.

    `seq` counts messages of this scheduler process (`scheduler_id`) from 1, each frontend seeing
    every number in order: a frontend that sees a gap asks for a snapshot (`KvSnapshotQuery`). A
    snapshot (`snapshot=True`, also sent to a new frontend and after the cache was cleared) lists
    every cached key in `stored` and replaces what the frontend knew; it repeats the `seq` of the
    last message, so the next delta follows on from it. A key both stored and evicted since the last
    message appears once, in the list of what happened last."""

    scheduler_id: str
    seq: int
    snapshot: bool = False
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    waiting: int = 0  # requests queued, not yet admitted
    running: int = 0  # sequences in the running batch
    free_blocks: int = 0  # device KV blocks not referenced (cached ones included: they can be evicted)
    total_blocks: int = 0
    step_time_ms: float = 0.0  # the median step time lately
    prefix_hit_tokens: int = 0  # since start: prompt tokens found in the prefix cache
    prefix_queried_tokens: int = 0  # since start: prompt tokens looked up
    draining: bool = False  # stopping (SIGTERM): it refuses new requests and finishes those it has


SchedulerMessage = Union[EngineInfo, EngineOutputs, RequestRejected, StatsResult, KvEvents]


# --------------------------------------------------------------------------
# scheduler <-> worker (internal, array-like; changes, not snapshots)
# --------------------------------------------------------------------------


class WorkerHello(_Internal, tag="w_hello"):
    """A worker's start-up handshake: its capacity and the model's facts."""

    rank: int
    world_size: int
    num_device_blocks: int  # KV blocks this rank can hold on its device
    num_host_blocks: int  # KV blocks of host swap space
    block_size: int  # tokens per block
    max_model_len: int  # tokens
    vocab_size: int
    eos_token_ids: list[int]
    model: str
    dtype: str
    device: str
    memory: dict[str, int] = field(default_factory=dict)  # bytes: weights, kv_cache, ...
    protocol_version: int = 1  # absent in frames of version 1, which had no such field


class NewSeq(Struct, array_like=True, omit_defaults=True):
    """A sequence the worker has not seen (or must rebuild after a preemption).

    `token_ids` are every known token (prompt + generated so far); `prompt_len`
    separates them, so the worker knows the generated-token index for seeding.
    """

    seq_id: int
    token_ids: list[int]
    prompt_len: int
    block_ids: list[int]
    params: SamplingParams
    output_index: int = 0  # which of the request's n outputs


class ScheduledSeq(Struct, array_like=True, omit_defaults=True):
    """Work for one sequence this step: compute tokens
    [num_computed_tokens, num_computed_tokens + num_tokens) of its token list.

    `new_block_ids` are appended to the sequence's block table first. When the
    chunk reaches the end of the known tokens the worker samples one token.
    """

    seq_id: int
    num_tokens: int
    num_computed_tokens: int
    new_block_ids: list[int] = field(default_factory=list)
    # Beam search: > 0 makes this a beam row: when it samples, the worker returns its top
    # `num_candidates` (token, logprob) in `StepResult.candidates` and appends no token. The token
    # the scheduler then chose comes back in `append_token_ids`, appended before this step's chunk.
    num_candidates: int = 0
    append_token_ids: list[int] = field(default_factory=list)
    # Speculative decoding (docs/speculative.md): proposed tokens verified after this chunk, which
    # must reach the sequence's end; their KV slots follow its known tokens in its table. The worker
    # returns the accepted ones plus one more in StepResult.extra_tokens and keeps only their KV.
    spec_token_ids: list[int] = field(default_factory=list)
    # >= 0: truncate the worker's table to this many blocks before appending `new_block_ids`
    # (blocks that held only rejected speculative slots were freed).
    block_table_len: int = -1
    # Draft-model speculation: the worker's draft model proposes this many tokens (greedy) into the
    # slots reserved after the sequence's known tokens, and the target verifies them as it does
    # `spec_token_ids` (which stay empty then). worker/spec_draft.py.
    num_draft_tokens: int = 0


BlockPairs = list[tuple[int, int]]  # (src block id, dst block id)


class StepPlan(_Internal, tag="plan"):
    """One step. The worker applies, in order: drop `finished_seq_ids`, swap_out,
    swap_in, copy, register `new_seqs`, then runs `scheduled` and samples."""

    step_id: int
    scheduled: list[ScheduledSeq]
    new_seqs: list[NewSeq] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)
    swap_out: BlockPairs = field(default_factory=list)  # device -> host
    swap_in: BlockPairs = field(default_factory=list)  # host -> device
    copy: BlockPairs = field(default_factory=list)  # device -> device (copy-on-write)
    # Indices into `scheduled` of the rows whose sampling is constrained by a grammar: rank 0
    # runs the forward, then waits for this step's `StepMasks` before it samples.
    masked_rows: list[int] = field(default_factory=list)


class StepMasks(_Internal, tag="masks"):
    """Sent to rank 0 right after a plan with `masked_rows`, filled while the worker runs its
    forward: per masked row, in that order, the mask of its sampled position, then one per
    speculative proposal of that row (`ScheduledSeq.spec_token_ids`, the position after each);
    a mask is ceil(vocab_size / 32) little-endian int32 words; bit j of word w allows token
    32 * w + j."""

    step_id: int
    bitmask: bytes


class Shutdown(_Internal, tag="shutdown"):
    """The worker exits 0 (draining or stopping), or 1 if it comes before `HelloAck`
    (the scheduler refused its hello; `reason` says why)."""

    reason: str = ""


class HelloAck(_Internal, tag="w_ack"):
    """The scheduler accepted a `WorkerHello`: the handshake is done, the worker is ready."""

    rank: int


class Rejoin(_Internal, tag="w_rejoin"):
    """The scheduler no longer counts this worker as a member of its group (it was declared
    dead or hung, or the scheduler restarted): forget every sequence and send `WorkerHello`
    again. A tensor-parallel rank exits instead (75, EX_TEMPFAIL), because its torch.distributed
    group must be re-created with its peers'."""

    reason: str = ""


PlanMessage = Union[StepPlan, StepMasks, Shutdown, HelloAck, Rejoin]


class StepResult(_Internal, tag="result"):
    """`sampled[i]` is the token sampled for `plan.scheduled[i]`, or -1 when that
    sequence's chunk did not reach its end (a partial prefill). A beam row's is meaningless:
    its answer is `candidates[i]`."""

    step_id: int
    sampled: list[int]
    step_time_s: float = 0.0  # worker-side wall time of the step
    # Aligned with `sampled` when any row asked for logprobs, else empty; None for rows without.
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # Aligned with `sampled` when any row carries prompt logprobs, else empty. A sequence's prompt
    # logprobs (prompt tokens 1..prompt_len-1) come whole with its first sampled token.
    prompt_logprobs: list[list[TokenLogprobs]] = field(default_factory=list)
    # Seconds of the step's worker phases: "prepare" (plan changes, input tensors), "forward" (the
    # model's layers), "sample" (LM head, sampling, bookkeeping). Wall-clock on the host: on CUDA, launches are
    # asynchronous, so device time lands where the host first waits (sampling).
    phase_times_s: dict[str, float] = field(default_factory=dict)
    # Aligned with `sampled` when any row is a beam row, else empty; None for the others.
    candidates: list[BeamCandidates | None] = field(default_factory=list)
    # Speculative decoding: aligned with `sampled` when any row speculated, else empty. A row's
    # tokens this step are [sampled[i]] + extra_tokens[i] (accepted proposals, then the target's
    # next token); extra_logprobs[i] aligned with extra_tokens[i] when the row asked for logprobs.
    extra_tokens: list[list[int]] = field(default_factory=list)
    extra_logprobs: list[list[TokenLogprobs | None]] = field(default_factory=list)


class BeamCandidates(Struct, array_like=True):
    """One beam row's best next tokens, best first: log_softmax of the raw logits (natural log,
    float32 precision), as transformers' beam search scores them."""

    token_ids: list[int]
    logprobs: list[float]


class WorkerError(_Internal, tag="w_error"):
    """A worker failed a step; the scheduler fails or retries the step's requests."""

    step_id: int
    message: str


class Heartbeat(_Internal, tag="w_beat"):
    """A worker says it is alive when it has sent nothing for min(1 s, heartbeat_timeout_s / 4).
    A step is synchronous (no beats during it), so a step that outlasts the timeout reads as a hang."""

    rank: int


WorkerMessage = Union[WorkerHello, StepResult, WorkerError, Heartbeat]


# --------------------------------------------------------------------------
# codecs
# --------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


def decoder_for(union: Any) -> msgspec.msgpack.Decoder:
    """One decoder per socket: decodes every message kind of that socket's union."""
    return msgspec.msgpack.Decoder(union)
