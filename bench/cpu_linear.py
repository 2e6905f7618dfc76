"""CPU matmuls of one forward pass: torch's F.linear against oneDNN on packed weights
(worker/cpu_linear.py), in the same run, on the same random weights.

    python bench/cpu_linear.py [--tokens 1 8 64 512] [--dtype float32] [--repeats 5] [--json FILE]

Shapes default to the default model (SmolLM2-135M: hidden 576, MLP 1536, 9 query and 3 KV
heads of 64, 30 layers, vocabulary 49,152). Every layer has its own weights, so they stream from
memory as in a real step instead of sitting in cache. Prints, per token count, the layer matmuls
(q/k/v, o, gate/up, down of all layers) and the LM head: median ms over --repeats passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from worker.cpu_linear import PackedLinear, onednn_available  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if not onednn_available():
        print("torch was built without oneDNN: nothing to compare", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    h, q, kv = args.hidden, args.heads * args.head_dim, args.kv_heads * args.head_dim
    shapes = [(q + 2 * kv, h), (h, q), (2 * args.intermediate, h), (h, args.intermediate)]  # (out, in)
    g = torch.Generator().manual_seed(0)
    layers = [[(torch.randn(o, i, generator=g) * 0.02).to(dtype) for o, i in shapes] for _ in range(args.layers)]
    packed = [[PackedLinear(w, None) for w in ws] for ws in layers]
    head = (torch.randn(args.vocab, h, generator=g) * 0.02).to(dtype)
    packed_head = PackedLinear(head, None)
    print(f"{args.layers} layers, hidden {h}, MLP {args.intermediate}, vocabulary {args.vocab}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} passes")
    print(f"{'tokens':>6} {'layers torch':>13} {'layers oneDNN':>14} {'ratio':>6} "
          f"{'head torch':>11} {'head oneDNN':>12} {'ratio':>6}")
    rows = []
    with torch.inference_mode():
        for m in args.tokens:
            inputs = {i: torch.randn(m, i, generator=g).to(dtype) for _, i in shapes}

            def layers_torch():
                for ws in layers:
                    for w in ws:
                        F.linear(inputs[w.shape[1]], w)

            def layers_onednn():
                for ps in packed:
                    for p in ps:
                        p(inputs[p.in_features])

            x = torch.randn(m, h, generator=g).to(dtype)
            row = {"tokens": m,
                   "layers_torch_ms": _median_ms(layers_torch, args.repeats),
                   "layers_onednn_ms": _median_ms(layers_onednn, args.repeats),
                   "head_torch_ms": _median_ms(lambda: F.linear(x, head), args.repeats),
                   "head_onednn_ms": _median_ms(lambda: packed_head(x), args.repeats)}
            rows.append(row)
            print(f"{m:>6} {row['layers_torch_ms']:>13.1f} {row['layers_onednn_ms']:>14.1f} "
                  f"{row['layers_torch_ms'] / row['layers_onednn_ms']:>5.2f}x {row['head_torch_ms']:>11.1f} "
                  f"{row['head_onednn_ms']:>12.1f} {row['head_torch_ms'] / row['head_onednn_ms']:>5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
