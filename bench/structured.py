"""`pagedserve bench structured`: what structured output costs a decode step, in one run.

    pagedserve bench structured [--num-seqs 64] [--rounds 2] [--dtype float32]

One server (prefix caching off, --max-num-seqs at least --num-seqs). Each round sends the same
--num-seqs chat requests twice, all at once: first constrained by a tool-call JSON Schema
(temperature 1.0, one seed each), then unconstrained with the same seeds, each with max_tokens
equal to its constrained twin's output length and ignore_eos, so both batches shrink the same
way, step by step. Per phase: wall time over the scheduler's step count gives the time per step
as a client sees it (the masks' fill, their trip to the worker, the matchers moving on, all in
it); the scheduler's own totals give the mask-fill time per step. The ratio constrained /
unconstrained is the cost; the issue's target is <= 1.10 (masks hidden behind the forward).
Results: a table and JSON under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from bench import report
from bench.launch import BenchServer
from shared.client import AsyncClient, Client
from shared.protocol import SamplingParams
from shared.structured import StructuredOutputs

TARGET_RATIO = 1.10
TOOL_CALL = {  # what an agent asks for: a tool name and its arguments
    "type": "object", "additionalProperties": False, "required": ["tool", "arguments"],
    "properties": {
        "tool": {"enum": ["web_search", "get_weather", "read_file", "send_email"]},
        "arguments": {"type": "object", "additionalProperties": False, "required": ["query", "max_results"],
                      "properties": {"query": {"type": "string", "maxLength": 60},
                                     "max_results": {"type": "integer", "minimum": 1, "maximum": 20},
                                     "filters": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                 "maxItems": 3}}},
    },
}
TOPICS = ["the weather in Paris", "flights to Tokyo", "the latest Python release", "a recipe for soup",
          "the file notes.txt", "an email to Bob", "the stock price of ACME", "the history of Rome"]
COUNTERS = ("steps", "tokens_generated", "structured_mask_steps", "structured_masks", "structured_mask_fill_s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve bench structured", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-seqs", type=int, default=64, help="requests per batch (default: 64)")
    parser.add_argument("--rounds", type=int, default=2, help="constrained + unconstrained pairs (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=160, help="cap of a constrained answer (tokens)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--tag", default=None, help="results file stem (default: structured-DEVICE-DTYPE)")
    return parser


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Call one tool to help with {TOPICS[i % len(TOPICS)]} (task {i}). "
                                         f"Answer with the tool call as JSON."}] for i in range(n)]


def _counters(address: str) -> dict:
    with Client(address) as client:
        stats = client.stats()
    return {name: stats.get(name, 0) for name in COUNTERS}


async def _batch(address: str, jobs: list[tuple[list[dict], SamplingParams]]):
    async with AsyncClient(address, timeout=None) as client:
        return await asyncio.gather(*(client.chat(m, p) for m, p in jobs))


def run_phase(address: str, jobs) -> tuple[dict, list]:
    """Send every job at once; the phase's wall time and the scheduler's counter deltas."""
    before = _counters(address)
    started = time.perf_counter()
    results = asyncio.run(_batch(address, jobs))
    wall_s = time.perf_counter() - started
    after = _counters(address)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    steps = max(1, delta["steps"])
    figures = {"wall_s": round(wall_s, 3), **delta, "ms_per_step": round(1000 * wall_s / steps, 3),
               "mask_fill_ms_per_step": round(1000 * delta["structured_mask_fill_s"] / steps, 4)}
    return figures, results


def summarize(rounds: list[dict]) -> dict:
    """Per round and overall: time per step constrained / unconstrained (steps summed over rounds)."""
    def total(phase, key):
        return sum(r[phase][key] for r in rounds)

    ms = {phase: 1000 * total(phase, "wall_s") / max(1, total(phase, "steps")) for phase in ("constrained", "free")}
    ratio = ms["constrained"] / ms["free"]
    return {"ms_per_step_constrained": round(ms["constrained"], 3), "ms_per_step_unconstrained": round(ms["free"], 3),
            "ratio": round(ratio, 4), "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO,
            "mask_fill_ms_per_step": round(1000 * total("constrained", "structured_mask_fill_s")
                                           / max(1, total("constrained", "structured_mask_steps")), 4),
            "masks_per_step": round(total("constrained", "structured_masks")
                                    / max(1, total("constrained", "structured_mask_steps")), 2)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stem = args.tag or f"structured-{args.device.replace(':', '')}-{args.dtype}"
    os.makedirs(args.out, exist_ok=True)
    flags = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--enable-prefix-caching",
             "false", "--max-num-seqs", str(max(64, args.num_seqs)), "--stats-interval-s", "5"]
    log_path = os.path.join(args.out, stem + ".server.log")
    print(f"starting the server (log: {log_path})", file=sys.stderr)
    chats = prompts(args.num_seqs)
    schema = StructuredOutputs(json=TOOL_CALL)
    rounds = []
    with BenchServer(flags, log_path) as server:
        run_phase(server.address, [(chats[0], SamplingParams(max_tokens=8))])  # warm-up: kernels, tokenizer
        for k in range(args.rounds):
            constrained = [(chat, SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=1000 * k + i,
                                                 structured_outputs=schema)) for i, chat in enumerate(chats)]
            shaped, results = run_phase(server.address, constrained)
            lengths = [len(r.token_ids) for r in results]
            free = [(chat, SamplingParams(max_tokens=n, temperature=1.0, seed=1000 * k + i, ignore_eos=True))
                    for i, (chat, n) in enumerate(zip(chats, lengths))]
            plain, _ = run_phase(server.address, free)
            shaped["finished_stop"] = sum(r.finish_reason == "stop" for r in results)
            rounds.append({"constrained": shaped, "free": plain, "output_tokens": sum(lengths)})
            print(f"round {k + 1}/{args.rounds}: {shaped['ms_per_step']} ms/step constrained, "
                  f"{plain['ms_per_step']} unconstrained", file=sys.stderr)
    summary = summarize(rounds)
    result = {"mode": "structured", "num_seqs": args.num_seqs, "rounds": rounds, "summary": summary,
              "schema": TOOL_CALL, "server_flags": flags, "model": args.model, "dtype": args.dtype,
              "environment": report.environment(args.device)}
    print(f"time per decode step at {args.num_seqs} sequences: constrained {summary['ms_per_step_constrained']} ms, "
          f"unconstrained {summary['ms_per_step_unconstrained']} ms, ratio {summary['ratio']} "
          f"(target <= {TARGET_RATIO}); mask fill {summary['mask_fill_ms_per_step']} ms per step, "
          f"{summary['masks_per_step']} masks per step")
    path = os.path.join(args.out, stem + ".json")
    report.write_json(path, result)
    print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
