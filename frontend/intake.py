"""A client's `Generate` -> a validated, tokenized `FrontendRequest`, or a typed error.

The checks only the frontend can make stay here: whether it takes requests now (draining,
starting, a refusing scheduler, bounds on what waits), the request id, exactly one of
prompt / messages / prompt_token_ids, tokenization. Everything about the token ids and the
sampling parameters is shared/validation.py's, the same checks (and messages) as the
scheduler's admission, against the limits the scheduler reported (frontend/engine_status.py).
"""

from __future__ import annotations

import time

from frontend.detokenizer import OutputText
from frontend.engine_status import EngineStatus
from frontend.metrics_trace import checked_traceparent
from frontend.requests import FrontendRequest, RequestTable
from frontend.tokenizer import Tokenizer, UnknownRole
from shared import protocol as p
from shared.config import ServerConfig
from shared.drain import Drain
from shared.protocol import ErrorCode
from shared.validation import Rejected, check_request


class Intake:
    """Decides whether a `Generate` becomes a request in flight; holds no state of its own."""

    def __init__(self, config: ServerConfig, tokenizer: Tokenizer, table: RequestTable, status: EngineStatus,
                 drain: Drain) -> None:
        self._max_client_requests = config.frontend.max_client_requests
        self._max_waiting = config.scheduler.max_waiting
        self._tokenizer = tokenizer
        self._table = table
        self._status = status
        self._drain = drain

    def admit(self, client: bytes, msg: p.Generate) -> FrontendRequest:
        """A new request for `msg`, not yet in the table and not yet sent; raises `Rejected`."""
        self._check_taking_requests(client, msg)
        prompt_ids = self._prompt_ids(msg)
        check_request(prompt_ids, msg.params, self._status.limits())
        params = msg.params
        decode = self._decoder_fn(params.skip_special_tokens)
        outputs = [OutputText(decode, prompt_ids, params.stop, params.include_stop_str_in_output, params.min_tokens)
                   for _ in range(params.n)]
        return FrontendRequest(request_id=msg.request_id, client=client, stream=msg.stream, prompt_ids=prompt_ids,
                               params=params, outputs=outputs, arrival=time.monotonic(), finish=[None] * params.n,
                               logprobs=[[] for _ in outputs] if params.logprobs is not None else None,
                               engine_id=msg.request_id, priority=msg.priority, arrival_wall=time.time(),
                               traceparent=checked_traceparent(msg.traceparent, msg.request_id))

    def _check_taking_requests(self, client: bytes, msg: p.Generate) -> None:
        if self._drain.draining:
            raise Rejected(ErrorCode.SHUTTING_DOWN, "the server is shutting down: send this request elsewhere")
        if self._status.refusal:
            raise Rejected(ErrorCode.UNAVAILABLE, f"the scheduler refuses this frontend: {self._status.refusal}")
        if not self._status.ever_ready:
            raise Rejected(ErrorCode.UNAVAILABLE, "the server is starting: no worker is ready yet")
        if not self._status.ready and len(self._table.held()) >= self._max_waiting:
            raise Rejected(ErrorCode.OVERLOADED, "the scheduler is recovering and max_waiting requests "
                                                 "wait for it already: retry later")
        if self._table.id_in_use(msg.request_id):
            raise Rejected(ErrorCode.INVALID_REQUEST, f"request id {msg.request_id!r} is already in flight")
        if self._table.count_of(client) >= self._max_client_requests:
            raise Rejected(ErrorCode.OVERLOADED, f"this client has max_client_requests {self._max_client_requests} "
                                                 f"requests in flight: retry when some have finished")

    def _prompt_ids(self, msg: p.Generate) -> list[int]:
        given = [x is not None for x in (msg.prompt, msg.messages, msg.prompt_token_ids)]
        if sum(given) != 1:
            raise Rejected(ErrorCode.INVALID_REQUEST, "give exactly one of prompt, messages, prompt_token_ids")
        if msg.prompt_token_ids is not None:
            ids = msg.prompt_token_ids  # their range is checked with the rest (shared/validation.py)
        else:
            try:
                if msg.prompt is not None:
                    ids = self._tokenizer.encode(msg.prompt)
                else:
                    ids = self._tokenizer.encode_chat([{"role": m.role, "content": m.content}
                                                       for m in msg.messages])
            except UnknownRole as e:
                raise Rejected(ErrorCode.INVALID_REQUEST, str(e)) from None
            except Exception as e:
                raise Rejected(ErrorCode.INVALID_REQUEST, f"cannot tokenize the prompt: {e}") from None
        if not ids:
            raise Rejected(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        return ids

    def _decoder_fn(self, skip_special_tokens: bool):
        tok = self._tokenizer
        return lambda ids: tok.decode(ids, skip_special_tokens=skip_special_tokens)
