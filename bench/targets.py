"""What `pagedserve bench throughput|serve` measures: a backend and how its runs are driven.

* zmq (default): pagedserve through the SDK's AsyncClient (bench/driver.py), at --server or a
  server started here; its stats add the KV usage peak, preemptions and decode phases.
* openai: any OpenAI-compatible HTTP server at --base-url (bench/openai_driver.py): pagedserve's
  HTTP API, `vllm serve`, llama-server. Nothing is started; the server's /v1/models answer is
  recorded, and its first model is used when --model is not given.

Both return the same summary (bench/metrics.py), so their reports have one shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from collections.abc import Iterator

from bench.driver import run_requests
from bench.metrics import summarize
from bench.phase_probe import probe
from bench.progress import ProgressBar


class WarmUpFailed(SystemExit):
    """The first, short request failed: the server is unreachable or rejects the requests."""


class Target:
    """One backend's runs: `run` sends a short warm-up request (start-up costs, such as the
    allocator and first-call paths, stay out of the run), then the requests, and summarizes."""

    backend = name = where = ""

    def _drive(self, requests, **kwargs):
        """-> (records, wall seconds, server figures) of one run (an asyncio driver's answer)."""
        raise NotImplementedError

    def run(self, requests, rate: float = math.inf, slos_ms: dict | None = None, probe_batch: int = 0,
            **kwargs) -> dict:
        """One run -> its summary with "_records"; probe_batch is for pagedserve's stats (zmq) only."""
        warm_up = self._drive([type(requests[0])(requests[0].prompt_ids[:8], 4)])[0][0]
        if not warm_up.ok:
            raise WarmUpFailed(f"the warm-up request to {self.where} failed: {warm_up.error}")
        label = self.name + ("" if math.isinf(rate) else f" at {rate:g} req/s")
        records, duration, figures = self._drive(requests, rate=rate, progress=ProgressBar(label, len(requests)),
                                                 **kwargs)
        return {**summarize(records, duration, slos_ms), **figures, "_records": records}


class ZmqTarget(Target):
    backend = "zmq"
    name = "pagedserve"

    def __init__(self, address: str, started_here: bool):
        self.where, self.started_here = address, started_here

    def describe(self) -> dict:
        return {"backend": self.backend, **({} if self.started_here else {"server": self.where})}

    def _drive(self, requests, **kwargs):
        return asyncio.run(run_requests(self.where, requests, **kwargs))

    def run(self, requests, rate: float = math.inf, slos_ms: dict | None = None, probe_batch: int = 0,
            **kwargs) -> dict:
        result = super().run(requests, rate, slos_ms, **kwargs)
        if probe_batch:
            print(f"  measuring decode phases at batch {probe_batch}", file=sys.stderr)
            result["phases"] = probe(self.where, probe_batch)
        return result


def served_model(models: dict) -> tuple[str | None, str | None]:
    """-> (first model id, its owner) of a /v1/models answer, (None, None) when it lists none."""
    data = models.get("data") if isinstance(models, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id"):
        return str(data[0]["id"]), data[0].get("owned_by")
    return None, None


class OpenAITarget(Target):
    backend = "openai"

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None):
        try:  # imported here: the zmq backend runs without aiohttp
            from bench import openai_driver
        except ImportError as exc:
            raise SystemExit(f"--backend openai needs aiohttp: pip install 'pagedserve[bench]' ({exc})") from None
        self.driver, self.where, self.api_key = openai_driver, base_url, api_key
        self.server_models = asyncio.run(openai_driver.fetch_models(base_url, api_key))
        first, owner = served_model(self.server_models)
        if model is None and first is None:
            raise SystemExit(f"--model is needed: {base_url}/v1/models named no model "
                             f"({self.server_models.get('error', 'an empty list')})")
        self.model = model or first
        listed = self.server_models.get("data") if isinstance(self.server_models.get("data"), list) else []
        owners = {m.get("id"): m.get("owned_by") for m in listed if isinstance(m, dict)}
        # The engine's name in tables: who serves it, as /v1/models says (vllm, llamacpp, ...).
        self.name = f"{owners.get(self.model) or owner or 'server'} via HTTP"

    def describe(self) -> dict:
        return {"backend": self.backend, "base_url": self.where, "model": self.model,
                "server_models": self.server_models}

    def _drive(self, requests, **kwargs):
        return asyncio.run(self.driver.run_requests(self.where, self.model, requests, api_key=self.api_key, **kwargs))


@contextlib.contextmanager
def open_target(args, log_path: str, server_flags: list[str]) -> Iterator[ZmqTarget | OpenAITarget]:
    """The backend of `args`: for zmq, --server or a server started with `server_flags` (its log at
    `log_path`) and stopped on exit; for openai, args.target made by `prepare_openai`."""
    if args.backend == "openai":
        yield args.target
    elif args.server:
        yield ZmqTarget(args.server, started_here=False)
    else:
        from bench.launch import BenchServer

        print(f"starting the server (log: {log_path})", file=sys.stderr)
        with BenchServer(server_flags, log_path) as server:
            yield ZmqTarget(server.address, started_here=True)


def prepare_openai(args) -> None:
    """--backend openai: ask the server for its models now, so --model is known (for file names)
    before the requests are made; sets args.target and args.model."""
    args.target = OpenAITarget(args.base_url, args.model, args.api_key)
    args.model = args.target.model
    print(f"driving {args.target.name} at {args.base_url}, model {args.model}", file=sys.stderr)


def check_backend_flags(parser: argparse.ArgumentParser, args, default_peers: list[str]) -> None:
    """Flags that only one backend reads are refused with the other, rather than ignored."""
    if args.backend == "openai":
        if not args.base_url or not args.base_url.startswith(("http://", "https://")):
            parser.error("--backend openai needs --base-url http://HOST:PORT")
        for flag, given in (("--server", args.server), ("--server-arg", args.server_arg),
                            ("--random-weights", args.random_weights), ("--peers", getattr(args, "peers", None))):
            if given:
                parser.error(f"{flag} is for --backend zmq (with openai the bench starts no server and runs no peers)")
        args.peers = []
    else:
        for flag, given in (("--base-url", args.base_url), ("--api-key", args.api_key)):
            if given:
                parser.error(f"{flag} is for --backend openai")
        args.model = args.model or "default"
        if args.mode == "throughput" and args.peers is None:
            args.peers = default_peers
