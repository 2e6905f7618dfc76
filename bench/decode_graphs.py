"""Decode steps replayed from CUDA graphs against the same steps run eagerly, in one run.

    python bench/decode_graphs.py [--preset llama3-8b] [--batch-sizes 1 4 16 64] [--context 512]
                                  [--steps 32] [--out FILE]
    python bench/decode_graphs.py --interpret-smoke --out /tmp/smoke.json   # CI, no GPU

One `ModelRunner` (random weights of the preset's shapes, bfloat16, the Triton backend) serves
both modes: for each batch size, `batch` sequences of `--context` prompt tokens are prefilled,
then `2 x --steps` decode steps alternate between the runner's graphs and eager execution, so
both modes see the same context lengths. Each step is
the worker's whole `execute` (inputs to the device, forward, sampling, tokens back to the host),
timed on the host; the median per mode and the ratio eager/graphs are printed and written as
JSON with the device, versions and command line (bench/results/decode-graphs-<device>.json, or
--out). Without CUDA it exits 2 unless --interpret-smoke: a tiny model in Triton's interpreter
with `eager_capture` stand-ins, to test this script (its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT  # run as a script: `import bench` must find the package, not this folder
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-8b", help="bench/random_model.py shape: llama3-8b, llama3-1b, tiny")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, default=512, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=32, help="decode steps per mode and batch size")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--interpret-smoke", action="store_true", help="tiny shapes in Triton's interpreter (CI)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/decode-graphs-<device>.json)")
    args = p.parse_args(argv)
    if args.interpret_smoke:
        args.preset, args.batch_sizes, args.context, args.steps, args.block_size = "tiny", [1, 3], 12, 4, 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.interpret_smoke:
        print("decode_graphs: needs CUDA (or --interpret-smoke)", file=sys.stderr)
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton_*.py are imported
    import triton

    from bench.random_model import write_random_model
    from shared.config import ServerConfig
    from shared.protocol import NewSeq, SamplingParams, ScheduledSeq, StepPlan
    from worker.decode_graphs import eager_capture
    from worker.model_runner import ModelRunner

    device = torch.device("cuda" if cuda else "cpu")
    max_batch, bs = max(args.batch_sizes), args.block_size
    blocks_per_seq = -(-(args.context + 2 * args.steps + 1) // bs)
    with tempfile.TemporaryDirectory() as model_dir:
        write_random_model(args.preset, model_dir)
        runner = ModelRunner(ServerConfig.from_settings(
            model=model_dir, device=str(device), dtype="bfloat16" if cuda else "float32", load_format="dummy",
            attention_backend="triton", block_size=bs, max_num_seqs=max_batch,
            num_kv_blocks=max_batch * blocks_per_seq, max_model_len=blocks_per_seq * bs))
        runner.load()
        if not cuda:
            runner.capture_decode_graphs(eager_capture)
        if runner.decode_graphs is None:
            print(f"decode_graphs: no graphs ({runner.cuda_graphs})", file=sys.stderr)
            return 1
        graphs = runner.decode_graphs
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        vocab = runner.args.vocab_size
        rows, step_id = [], 0
        for batch in args.batch_sizes:
            ids = list(range(batch))
            tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in ids]
            prompts = [[(7 * i + 13 * j) % vocab for j in range(args.context)] for i in ids]
            new = [NewSeq(i, prompts[i], args.context, tables[i], params) for i in ids]
            runner.execute(StepPlan(step_id, [ScheduledSeq(i, args.context, 0) for i in ids], new))
            step_id, computed = step_id + 1, args.context
            times: dict[str, list[float]] = {"graphs": [], "eager": []}
            for k in range(2 * args.steps):
                mode = "graphs" if k % 2 == 0 else "eager"  # alternate: both see the same contexts
                runner.decode_graphs = graphs if mode == "graphs" else None
                plan = StepPlan(step_id, [ScheduledSeq(i, 1, computed) for i in ids])
                started = time.perf_counter()
                runner.execute(plan)  # ends with the sampled tokens on the host: a full sync
                times[mode].append(time.perf_counter() - started)
                step_id, computed = step_id + 1, computed + 1
            runner.decode_graphs = graphs
            runner.execute(StepPlan(step_id, [], finished_seq_ids=ids))
            step_id += 1
            graph_ms, eager_ms = (statistics.median(times[m]) * 1e3 for m in ("graphs", "eager"))
            row = {"batch": batch, "context": args.context, "graphs_ms": round(graph_ms, 3),
                   "eager_ms": round(eager_ms, 3), "eager_over_graphs": round(eager_ms / graph_ms, 3),
                   "graphs_tok_s": round(batch / graph_ms * 1e3, 1), "eager_tok_s": round(batch / eager_ms * 1e3, 1),
                   "padded_to": graphs.padded_size(batch)}
            rows.append(row)
            print(f"batch {batch:4d}: graphs {graph_ms:8.2f} ms  eager {eager_ms:8.2f} ms  "
                  f"eager/graphs {row['eager_over_graphs']:.2f}x", flush=True)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()}, Triton interpreter)"
    result = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "command": " ".join([os.path.basename(sys.executable), "bench/decode_graphs.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "preset": args.preset, "dtype": str(runner.dtype).removeprefix("torch."), "steps": args.steps,
        "cuda_graphs": runner.cuda_graphs, "rows": rows,
    }
    out = args.out or os.path.join(_ROOT, "bench", "results", f"decode-graphs-{_slug(name)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]


if __name__ == "__main__":
    sys.exit(main())
