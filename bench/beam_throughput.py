"""`pagedserve bench throughput --beam-width W`: beam search requests/s, pagedserve against
transformers' beam search, on the same requests in one run.

pagedserve gets every request at once (one `AsyncClient.beam_search` each: W beams, the best
hypothesis returned, EOS ignored and max_tokens = the request's output length, so every engine
does the same number of steps); then, with the server stopped, transformers runs
`generate(num_beams=W, max_new_tokens=output length, eos_token_id=None)` on each prompt in turn
(its beam search takes one prompt's beams as its batch). Reported: requests/s, best-hypothesis
tokens/s, and on how many requests the best hypotheses are identical.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from bench import report
from bench.launch import BenchServer
from bench.progress import ProgressBar
from bench.workload import BenchRequest
from shared.client import AsyncClient


async def _ours(address: str, requests: list[BenchRequest], width: int) -> tuple[list[list[int]], float, dict]:
    async with AsyncClient(address, timeout=None) as client:
        before = await client.stats()
        started = time.perf_counter()
        completions = await asyncio.gather(*(
            client.beam_search(r.prompt_ids, width, max_tokens=r.output_len, ignore_eos=True) for r in requests))
        duration = time.perf_counter() - started
        after = await client.stats()
    figures = {k: after.get(k, 0) - before.get(k, 0) for k in ("beam_kv_blocks_shared", "beam_kv_blocks_unshared",
                                                                 "beam_forks", "preemptions", "steps")}
    figures["kv_blocks_used_peak"] = after.get("kv_blocks_used_peak", 0)
    figures["kv_blocks_total"] = after.get("kv_blocks_total", 0)
    return [c.outputs[0].token_ids for c in completions], duration, figures


def _transformers(args, requests: list[BenchRequest], width: int) -> tuple[list[list[int]], float]:
    import torch

    from bench.peers import load_hf_model
    from shared.models import resolve_model

    files = resolve_model(args.model)
    model = load_hf_model(files.directory, files.gguf_file, args.dtype, args.device,
                          random_weights=bool(args.random_weights))
    bar = ProgressBar(f"transformers beam search (width {width})", len(requests))
    outputs = []
    started = time.perf_counter()
    with torch.inference_mode():
        for i, r in enumerate(requests):
            ids = torch.tensor([r.prompt_ids], device=args.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, do_sample=False,
                                 max_new_tokens=r.output_len, min_new_tokens=r.output_len, eos_token_id=None,
                                 pad_token_id=0, early_stopping=False)
            outputs.append(out[0, len(r.prompt_ids):].tolist())
            bar(i + 1)
    return outputs, time.perf_counter() - started


def _engine(tokens: list[list[int]], duration: float, **extra) -> dict:
    return {"duration_s": round(duration, 3), "requests_per_s": round(len(tokens) / duration, 4),
            "output_tokens_per_s": round(sum(map(len, tokens)) / duration, 2), **extra}


def add_arguments(throughput) -> None:
    """`--beam-width` on `pagedserve bench throughput`'s parser."""
    throughput.add_argument("--beam-width", type=int, default=0, metavar="W",
                            help="beam search with W beams against transformers' beam search, requests/s "
                                 "(bench/beam_throughput.py; --peers are not run)")


def beam_throughput(args) -> int:
    from bench.cli import _requests, _server_flags, _stem  # bench/cli.py imports this module

    width = args.beam_width
    _, requests = _requests(args)
    os.makedirs(args.out, exist_ok=True)
    stem, server_flags = _stem(args).replace("throughput", f"throughput-beam{width}", 1), _server_flags(args)
    if args.backend != "zmq":
        print("pagedserve bench: --beam-width drives pagedserve through the SDK (--backend zmq)", file=sys.stderr)
        return 2
    if args.server:
        ours, duration, figures = asyncio.run(_ours(args.server, requests, width))
    else:
        with BenchServer(server_flags, os.path.join(args.out, stem + ".server.log")) as server:
            ours, duration, figures = asyncio.run(_ours(server.address, requests, width))
    shared, unshared = figures["beam_kv_blocks_shared"], figures["beam_kv_blocks_unshared"]
    engines = {"pagedserve": _engine(ours, duration, **figures,
                                     kv_saved_by_sharing=round(1 - shared / max(1, unshared), 4))}
    theirs, their_duration = _transformers(args, requests, width)
    engines["transformers beam search"] = _engine(theirs, their_duration)
    identical = sum(a == b for a, b in zip(ours, theirs))
    result = {"mode": "throughput-beam-search", "beam_width": width, "num_prompts": len(requests), "seed": args.seed,
              "model": args.random_weights or args.model, "dtype": args.dtype,
              "prompt_tokens_mean": sum(len(r.prompt_ids) for r in requests) / len(requests),
              "output_tokens_mean": sum(r.output_len for r in requests) / len(requests),
              "environment": report.environment(args.device), "engines": engines,
              "ratio_requests_per_s": round(engines["pagedserve"]["requests_per_s"]
                                            / engines["transformers beam search"]["requests_per_s"], 3),
              "best_hypothesis_identical": {"identical": identical, "compared": len(requests)}}
    path = os.path.join(args.out, stem + ".json")
    report.write_json(path, result)
    print(f"\nbeam search, width {width}, {len(requests)} requests (EOS ignored, best hypothesis returned)")
    print(f"  {'engine':<28}{'requests/s':>12}{'tokens/s':>10}{'seconds':>9}")
    for name, e in engines.items():
        print(f"  {name:<28}{e['requests_per_s']:>12.3f}{e['output_tokens_per_s']:>10.1f}{e['duration_s']:>9.1f}")
    print(f"pagedserve / transformers: {result['ratio_requests_per_s']:.2f}x requests/s; best hypotheses identical "
          f"on {identical} of {len(requests)}; KV block-steps saved by sharing: {1 - shared / max(1, unshared):.1%}")
    print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    return 0 if ours and all(ours) else 1
