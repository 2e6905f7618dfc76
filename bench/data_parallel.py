"""`pagedserve bench data-parallel`: routing policies on a multi-turn chat workload.

For each configuration (2 replicas of the default model on ShareGPT conversations; 4 replicas of
the tiny random-weight model on synthetic conversations, bench/random_model.py) and each routing
policy (prefix, round_robin, least_loaded), a fresh `serve --data-parallel-size N` runs the same
conversations (bench/multiturn.py: every turn extends the previous prompt): throughput (requests
and generated tokens per second, wall clock of the whole workload) and the prefix-cache hit rate
(hit / looked-up prompt tokens over all replicas, from `stats`), with the routing decisions by
cause. Results: bench/results/data-parallel.json and data-parallel.png. A fresh server per policy,
so no policy finds another's blocks cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

from bench.launch import BenchServer
from bench.multiturn import hit_rate, run_conversations, sharegpt_conversations

POLICIES = ("prefix", "round_robin", "least_loaded")


def synthetic_conversations(num: int, turns: int, user_tokens: int, vocab: int, seed: int) -> list[list[list[int]]]:
    """Random token ids (the random model's tokenizer has no words for ShareGPT's text)."""
    rng = random.Random(seed)
    return [[[rng.randrange(3, vocab) for _ in range(user_tokens)] for _ in range(turns)] for _ in range(num)]


async def _run(address: str, convs, answer_tokens: int, think_s: float) -> dict:
    from shared.async_client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        before = await client.stats()
        started = time.perf_counter()
        answers = await run_conversations(client, convs, answer_tokens, think_s=think_s, seed=1)
        wall = time.perf_counter() - started
        after = await client.stats()
    requests = sum(len(c) for c in convs)
    generated = sum(len(a) for conv in answers for a in conv)
    return {"wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "output_tokens_per_s": round(generated / wall, 2),
            "prefix_cache_hit_rate": round(hit_rate(before, after), 4),
            "routed": after.get("routed", {}),
            "per_replica_hit_rate": [r["prefix_cache_hit_rate"] for r in after.get("replicas", [])]}


def run_config(name: str, replicas: int, flags: list[str], convs, answer_tokens: int, out: str,
               think_s: float) -> dict:
    results = {}
    for policy in POLICIES:
        log = os.path.join(out, f"data-parallel-{name}-{policy}.server.log")
        with BenchServer(["--data-parallel-size", str(replicas), "--routing-policy", policy, *flags], log) as srv:
            results[policy] = asyncio.run(_run(srv.address, convs, answer_tokens, think_s))
        print(f"{name} {policy}: {results[policy]}", file=sys.stderr)
    base = results["round_robin"]
    for policy, r in results.items():
        r["hit_rate_vs_round_robin"] = round(r["prefix_cache_hit_rate"] / base["prefix_cache_hit_rate"], 3) \
            if base["prefix_cache_hit_rate"] else None
        r["throughput_vs_round_robin"] = round(r["requests_per_s"] / base["requests_per_s"], 3)
    return {"replicas": replicas, "flags": flags, "conversations": len(convs), "turns": len(convs[0]),
            "answer_tokens": answer_tokens, "think_s": think_s, "policies": results}


def plot(result: dict, path: str) -> None:
    from bench.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return
    configs = list(result["configs"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(POLICIES)
    for j, (metric, label) in enumerate((("prefix_cache_hit_rate", "prefix-cache hit rate"),
                                         ("requests_per_s", "requests / s"))):
        ax = axes[j]
        for k, policy in enumerate(POLICIES):
            values = [result["configs"][c]["policies"][policy][metric] for c in configs]
            ax.bar([i + k * width for i in range(len(configs))], values, width, label=policy)
        ax.set_xticks([i + width for i in range(len(configs))], configs)
        ax.set_title(label)
        ax.legend()
    fig.suptitle("routing between engine replicas, multi-turn workload")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve bench data-parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    # The defaults are tests/integration/test_data_parallel.py's workload: two replicas' caches hold
    # about their share of the conversations, not a copy of all of them.
    parser.add_argument("--conversations", type=int, default=24, help="per 2 replicas (tiny-4: twice as many)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--user-tokens", type=int, default=40, help="tokens per human message at most")
    parser.add_argument("--answer-tokens", type=int, default=12)
    parser.add_argument("--think-s", type=float, default=0.5,
                        help="each turn first waits a random 0..THINK_S seconds: conversations interleave")
    parser.add_argument("--num-kv-blocks", type=int, default=80, help="per replica (cache pressure)")
    parser.add_argument("--only", choices=["default-2", "tiny-4"], default=None, help="one configuration")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    common = ["--device", "cpu", "--num-kv-blocks", str(args.num_kv_blocks)]
    result = {"bench": "data-parallel", "configs": {}}
    if args.only in (None, "default-2"):
        from frontend.tokenizer import Tokenizer
        from shared.models import resolve_model

        convs = sharegpt_conversations(args.conversations, args.turns, args.user_tokens, 0,
                                       Tokenizer(resolve_model("default")))
        result["configs"]["default-2"] = run_config("default-2", 2, ["--model", "default", "--dtype", "float32",
                                                                     *common], convs, args.answer_tokens, args.out,
                                                     args.think_s)
    if args.only in (None, "tiny-4"):
        from bench.random_model import PRESETS, write_random_model

        model = write_random_model("tiny", tempfile.mkdtemp(prefix="pagedserve-tiny-"))
        convs = synthetic_conversations(args.conversations * 2, args.turns, args.user_tokens,
                                        PRESETS["tiny"]["vocab_size"], 0)
        result["configs"]["tiny-4"] = run_config("tiny-4", 4, ["--model", model, "--load-format", "dummy", *common],
                                                 convs, args.answer_tokens, args.out, args.think_s)
    path = os.path.join(args.out, "data-parallel.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "data-parallel.png"))
    print(json.dumps({c: {p: (r["prefix_cache_hit_rate"], r["requests_per_s"]) for p, r in v["policies"].items()}
                      for c, v in result["configs"].items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
