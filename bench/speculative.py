"""Speculative decoding (ngram, draft model) on vs off, default model, scheduler and worker in one process.

`python -m bench.speculative [--concurrency 1 4 16 64] [--max-tokens 96] [--draft default random]
[--out bench/results/speculative.json]`

Workloads:
* grounded: a ShareGPT answer of 300-800 tokens (the passage) wrapped in one of three chat
  instructions, in turn: repeat it exactly, rewrite it with its typos fixed, summarize it. The
  output is grounded in the prompt, as in agent/RAG traffic (what prompt lookup is for).
* sharegpt: plain ShareGPT first turns (bench/workload.py), the throughput guard at high load.

Per concurrency c: c requests at a time, 2c requests in all (closed loop: one joins when one
finishes), max_tokens tokens each (ignore_eos), greedy. TPOT per request = (last token time -
first token time) / (tokens - 1), median over requests; output tok/s = output tokens / wall time
of the run. The same requests run with speculation off and on, back to back, in the same process:
the ratios are the result. The machine is shared (2 cores, other jobs): numbers are noisy.
No server, no sockets: this measures the engine (scheduler + worker), not the frontend.

`--draft NAME ...` adds draft-model runs (`--speculative-method draft`) on the grounded workload at
`--draft-concurrency` (default 1): `default` is the default model as its own draft (the mechanics
at acceptance about 1.0; no speed-up to expect, the draft costing what the target does), `random`
a 2-layer random-weight Llama with the default model's tokenizer (bench/random_model.py "tiny",
vocabulary widened to the target's; acceptance about 0), any other NAME a model path. Each
reports acceptance and TPOT against speculation off over the same requests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

INSTRUCTIONS = ("Repeat the following text exactly, word for word:\n\n{}",
                "Rewrite the following text with any typos fixed; keep everything else the same:\n\n{}",
                "Summarize the following text, quoting its key sentences:\n\n{}")


def grounded_prompts(tokenizer, num: int, seed: int = 0) -> list[list[int]]:
    """Chat prompts that ask to repeat, edit or summarize a 300-800-token ShareGPT answer."""
    import random

    from bench.workload import iter_sharegpt

    answers = [c["conversations"][1]["value"] for c in iter_sharegpt() if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(answers)
    prompts = []
    for answer in answers:
        if not 300 <= len(tokenizer.encode(answer, add_special_tokens=False)) <= 800:
            continue
        text = INSTRUCTIONS[len(prompts) % len(INSTRUCTIONS)].format(answer)
        prompts.append(list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, return_dict=False)))
        if len(prompts) == num:
            return prompts
    raise RuntimeError(f"only {len(prompts)} ShareGPT answers of 300-800 tokens")


def random_draft(files, directory: str) -> str:
    """A random-weight tiny Llama (bench/random_model.py) with `files`' tokenizer and vocabulary: a draft
    of the right vocabulary whose proposals are almost never accepted. Serve it with draft_load_format dummy."""
    import os

    import transformers

    from bench.random_model import write_random_model

    write_random_model("tiny", directory)
    for name in os.listdir(directory):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(directory, name))
    tokenizer = transformers.AutoTokenizer.from_pretrained(files.directory, gguf_file=files.gguf_file)
    tokenizer.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    config = json.loads(Path(path).read_text())
    config["vocab_size"] = len(tokenizer.get_vocab())
    Path(path).write_text(json.dumps(config, indent=2))
    return directory


def run_once(runner, prompts: list[list[int]], concurrency: int, max_tokens: int, k: int, max_batch: int,
             method: str = "ngram") -> dict:
    from scheduler.scheduler import Scheduler
    from shared.config import ServerConfig
    from shared.protocol import AddRequest, SamplingParams

    hello = runner.hello()
    config = ServerConfig.from_settings(max_num_seqs=max(concurrency, 1), speculative_method=method if k else "none",
                                        num_speculative_tokens=k, speculative_max_batch=max_batch)
    sched = Scheduler(config.scheduler, num_device_blocks=hello.num_device_blocks, block_size=hello.block_size,
                      max_model_len=hello.max_model_len, vocab_size=hello.vocab_size,
                      eos_token_ids=hello.eos_token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pending = list(enumerate(prompts))
    times: dict[int, list[float]] = {}
    in_flight = 0
    started = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            sched.add_request(AddRequest(f"r{i}", prompt, params, 0.0, 0), b"bench")
            in_flight += 1
        for _, delta in sched.update(runner.execute(sched.schedule())):
            now = time.perf_counter()
            times.setdefault(int(delta.request_id[1:]), []).extend([now] * len(delta.token_ids))
            in_flight -= delta.finish_reason is not None
    wall = time.perf_counter() - started
    runner.batch.drop(list(runner.batch.seqs))
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    stats = sched.stats()
    out = {"tpot_ms_median": 1000 * statistics.median(tpots), "output_tok_s": sum(map(len, times.values())) / wall,
           "wall_s": wall, "steps": stats["steps"]}
    if k:
        out["acceptance_rate"] = stats["spec_accepted_tokens"] / max(1, stats["spec_proposed_tokens"])
        out["mean_accepted_per_row"] = stats["spec_accepted_tokens"] / max(1, stats["spec_rows"])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=4, help="--num-speculative-tokens")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="--speculative-max-batch (default: the config's; 0: speculate at any batch size)")
    parser.add_argument("--workloads", nargs="+", default=["grounded", "sharegpt"])
    parser.add_argument("--sharegpt-concurrency", type=int, default=64)
    parser.add_argument("--draft", nargs="*", default=[],
                        help="draft-model runs: default (self-draft), random (random weights), or a model path")
    parser.add_argument("--draft-concurrency", type=int, default=1)
    parser.add_argument("--out", default="bench/results/speculative.json")
    args = parser.parse_args(argv)

    import transformers

    from bench.workload import load_requests
    from shared.config import ServerConfig
    from shared.models import resolve_model
    from worker.model_runner import ModelRunner

    files = resolve_model("default")
    tokenizer = transformers.AutoTokenizer.from_pretrained(files.directory, gguf_file=files.gguf_file)
    runner = ModelRunner(ServerConfig.from_settings(model="default", max_num_seqs=max(args.concurrency),
                                                    max_model_len=2048))
    runner.load()
    max_batch = ServerConfig().scheduler.speculative_max_batch if args.max_batch is None else args.max_batch
    results = {"model": files.name, "k": args.k, "max_tokens": args.max_tokens, "speculative_max_batch": max_batch,
               "runs": []}
    plans = []
    if "grounded" in args.workloads:
        prompts = grounded_prompts(tokenizer, 2 * max(args.concurrency))
        plans += [("grounded", c, prompts[:2 * c]) for c in args.concurrency]
    if "sharegpt" in args.workloads:
        _, reqs = load_requests(2 * args.sharegpt_concurrency, source="sharegpt")
        plans.append(("sharegpt", args.sharegpt_concurrency, [r.prompt_ids for r in reqs]))
    for workload, c, prompts in plans:
        off = run_once(runner, prompts, c, args.max_tokens, 0, 0)
        on = run_once(runner, prompts, c, args.max_tokens, args.k, max_batch)
        row = {"workload": workload, "concurrency": c, "off": off, "on": on,
               "tpot_speedup": off["tpot_ms_median"] / on["tpot_ms_median"],
               "throughput_ratio": on["output_tok_s"] / off["output_tok_s"]}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    if args.draft:
        results["draft_runs"] = draft_runs(args, files, tokenizer, runner)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


def draft_runs(args, files, tokenizer, plain) -> list[dict]:
    """Per --draft: speculation off (the plain runner) then on with that draft, same requests."""
    import gc
    import tempfile

    from shared.config import ServerConfig
    from worker.model_runner import ModelRunner

    c = args.draft_concurrency
    prompts = grounded_prompts(tokenizer, 2 * c, seed=1)
    off = run_once(plain, prompts, c, args.max_tokens, 0, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.draft:
            path = random_draft(files, tmp) if name == "random" else name
            runner = ModelRunner(ServerConfig.from_settings(
                model="default", max_num_seqs=max(c, 1), max_model_len=2048, speculative_method="draft",
                num_speculative_tokens=args.k, draft_model=path,
                draft_load_format="dummy" if name == "random" else "auto"))
            runner.load()
            on = run_once(runner, prompts, c, args.max_tokens, args.k, 0, method="draft")
            row = {"workload": "grounded", "draft": name, "concurrency": c, "off": off, "on": on,
                   "acceptance_rate": on["acceptance_rate"],
                   "tpot_speedup": off["tpot_ms_median"] / on["tpot_ms_median"],
                   "throughput_ratio": on["output_tok_s"] / off["output_tok_s"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del runner
            gc.collect()
    return rows


if __name__ == "__main__":
    main()
