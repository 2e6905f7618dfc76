"""Profile the worker's decode step alone (no scheduler, no IPC): where a step's time goes.

    python -m bench.step_profile [--batch 64] [--context 512] [--steps 20] [--dtype float32]
                                 [--cpu-linear auto|onednn|torch] [--ops 15] [--prefill]

Builds a ModelRunner for --model, registers --batch sequences of --context random
prompt tokens, prefills them, then times --steps decode steps (ModelRunner.execute,
greedy) and prints the phases the runner reports (StepResult.phase_times_s) and,
with --ops N, torch.profiler's top N operators by self CPU time. --prefill times (and with --ops
profiles) the prefill steps instead: as many whole prompts per step as the token budget holds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--cpu-linear", default="auto", choices=["auto", "onednn", "torch"])
    parser.add_argument("--ops", type=int, default=0, help="print torch.profiler's top N ops")
    parser.add_argument("--prefill", action="store_true", help="time the prefill steps, not decode")
    args = parser.parse_args(argv)

    import torch

    from shared.config import ServerConfig
    from shared.logging import configure_logging
    from shared.protocol import NewSeq, SamplingParams, ScheduledSeq, StepPlan
    from worker.model_runner import ModelRunner

    configure_logging("bench", "warning")
    blocks_per_seq = -(-(args.context + args.steps + 1) // args.block_size)
    extra = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    config = ServerConfig.from_settings(model=args.model, device=args.device, dtype=args.dtype,
                                        block_size=args.block_size, num_kv_blocks=args.batch * blocks_per_seq + 1,
                                        max_num_batched_tokens=max(2048, args.context),
                                        max_num_seqs=max(256, args.batch),
                                        cpu_linear=args.cpu_linear, **extra)
    runner = ModelRunner(config)
    runner.load()
    rng = random.Random(0)
    vocab = runner.args.vocab_size
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.steps + 1)
    new_seqs = [NewSeq(i, [rng.randrange(vocab) for _ in range(args.context)], args.context,
                       list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), greedy) for i in range(args.batch)]
    step_id = 0
    # Prefill a few sequences per step, within the token budget.
    per_step = max(1, config.scheduler.max_num_batched_tokens // args.context)
    prefill_times = []
    for first in range(0, args.batch, per_step):
        ids = range(first, min(args.batch, first + per_step))
        plan = StepPlan(step_id, [ScheduledSeq(i, args.context, 0) for i in ids], new_seqs=[new_seqs[i] for i in ids])
        profiling = args.prefill and args.ops and first > 0 and first + per_step >= args.batch
        started = time.perf_counter()
        if profiling:  # the last full step, after a warm-up
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                runner.execute(plan)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
        else:
            runner.execute(plan)
        if first > 0 and len(ids) == per_step and not profiling:
            prefill_times.append(time.perf_counter() - started)
        step_id += 1
    if args.prefill:
        step_ms = statistics.median(prefill_times) * 1000 if prefill_times else float("nan")
        print(f"prefill step, {per_step} prompts of {args.context} tokens, {args.dtype}, "
              f"{torch.get_num_threads()} threads: median {step_ms:.1f} ms over {len(prefill_times)} steps "
              f"({step_ms / (per_step * args.context):.3f} ms per token)")
        return 0
    computed = args.context

    def decode_step():
        nonlocal step_id, computed
        result = runner.execute(StepPlan(step_id, [ScheduledSeq(i, 1, computed) for i in range(args.batch)]))
        step_id += 1
        computed += 1
        return result

    decode_step()  # warm-up
    times, phases = [], {}
    for _ in range(args.steps - 1):
        started = time.perf_counter()
        result = decode_step()
        times.append(time.perf_counter() - started)
        for name, seconds in getattr(result, "phase_times_s", {}).items():
            phases.setdefault(name, []).append(seconds)
    step_ms = statistics.median(times) * 1000
    print(f"decode step, batch {args.batch}, context {args.context}, {args.dtype}, "
          f"{torch.get_num_threads()} threads: median {step_ms:.1f} ms "
          f"({args.batch / step_ms * 1000:.0f} tokens/s)")
    for name, values in phases.items():
        ms = statistics.median(values) * 1000
        print(f"  {name:<10}{ms:8.2f} ms {ms / step_ms:7.1%}")
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                decode_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
