"""What the client commands (`generate`, `stats`) share: the server address check, and
stdout that may be a closed pipe (`pagedserve stats --json | head -c 100`)."""

from __future__ import annotations

import os
import re
import sys

_HOST_PORT = re.compile(r"^\[?[\w.:-]+\]?:\d+$")


def address_problem(address: str) -> str | None:
    """None for a ZeroMQ endpoint the SDK can connect to; else one line saying what to type."""
    if address.startswith(("tcp://", "ipc://")):
        return None
    if address.startswith(("http://", "https://")):
        rest = address.split("://", 1)[1].rstrip("/")
        return (f"--server {address}: pagedserve's SDK speaks ZeroMQ, not HTTP; "
                f"give tcp://HOST:PORT, e.g. --server tcp://{rest}")
    if _HOST_PORT.match(address):
        return f"--server {address}: give the scheme too: --server tcp://{address}"
    return f"--server {address}: not an endpoint; give tcp://HOST:PORT (or ipc://PATH)"


def check_address_or_exit(command: str, address: str) -> None:
    problem = address_problem(address)
    if problem is not None:
        print(f"pagedserve {command}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def quiet_broken_pipe() -> int:
    """The reader of stdout went away: stop writing, exit 0 without a traceback. (Python would
    report the error again when it flushes stdout at exit; point stdout at /dev/null first.)"""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0
