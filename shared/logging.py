"""structlog JSON on stdout, one object per line, nothing else on stdout.

Event names are stable (see docs/events.md); fields carry units in their names
(`*_s` seconds, `*_tokens`, `*_blocks`, `*_bytes`). Several processes share one
stdout under `pagedserve serve`, so each line goes out in a single write(2),
which keeps lines whole (a pipe write under PIPE_BUF bytes is atomic).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _LineWriter:
    """A structlog logger that writes each rendered event with one os.write to fd 1."""

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "replace")
        fd = sys.stdout.fileno() if hasattr(sys.stdout, "fileno") else 1
        while data:
            n = os.write(fd, data)
            data = data[n:]

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _writer_factory(*_args) -> _LineWriter:
    return _LineWriter()


def configure_logging(role: str, level: str = "info") -> None:
    """Call once per process, first thing. `role` is added to every event."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _add_role(role),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=_writer_factory,
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging: keep them off stdout.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def _add_role(role: str):
    pid = os.getpid()

    def processor(_logger, _name, event_dict):
        event_dict.setdefault("role", role)
        event_dict.setdefault("pid", pid)
        return event_dict

    return processor


def get_logger(name: str | None = None):
    return structlog.get_logger(name)
