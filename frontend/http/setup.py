"""Build the HTTP listener from the config and the frontend's parts (frontend/server.py)."""

from __future__ import annotations

from collections.abc import Callable

from frontend.engine_status import EngineStatus
from frontend.http.app import HttpApi, RenderMetrics
from frontend.http.auth import ApiKeys
from frontend.http.exchange import Abort, Generation, Submit
from frontend.http.health import HealthProbe, Stats
from frontend.http.listener import HttpListener
from frontend.http.logprobs import TokenTexts
from frontend.http.replies import ReplyRouter
from shared.config import ServerConfig
from shared.drain import Drain


def make_listener(config: ServerConfig, *, keys: ApiKeys, replies: ReplyRouter, submit: Submit, abort: Abort,
                  status: EngineStatus, drain: Drain, engine_stats: Stats, model_name: str,
                  decode: Callable[[list[int]], str], render_metrics: RenderMetrics | None) -> HttpListener:
    """`model_name`: the model's own name, served unless served_model_name is set; `decode`: token
    ids -> text with special tokens kept (the token strings of logprobs)."""
    served = config.model.served_model_name or model_name
    api = HttpApi(generation=Generation(replies, submit, abort), keys=keys,
                  health=HealthProbe(status, drain, engine_stats, stall_after_s=config.scheduler.heartbeat_timeout_s),
                  model=served, max_model_len=lambda: status.info.max_model_len if status.info else None,
                  texts=TokenTexts(decode), render_metrics=render_metrics)
    return HttpListener(api.app, config.frontend.http_listen, auth=keys.required)
