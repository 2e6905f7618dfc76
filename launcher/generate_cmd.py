"""`pagedserve generate`: stream one answer from a running server to stdout."""

from __future__ import annotations

import sys
import time

from shared.client import Client, RequestError
from shared.protocol import SamplingParams


def _wait_ready(client: Client, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.health(timeout=2.0)["status"] == "ok":
                return
        except RequestError:
            pass
        if time.monotonic() >= deadline:
            raise RequestError("unavailable", f"server {client.address} not ready after {seconds} s")
        time.sleep(0.5)


def run_generate(args) -> int:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    with Client(args.server) as client:
        try:
            if args.wait > 0:
                _wait_ready(client, args.wait)
            stream = (client.stream(args.prompt, params) if args.raw
                      else client.stream_chat([{"role": "user", "content": args.prompt}], params))
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except RequestError as e:
            print(f"pagedserve generate: {e}", file=sys.stderr)
            return 1
    return 0
