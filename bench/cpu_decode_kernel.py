"""CPU paged decode attention: the C++ kernel against a baseline revision of itself and SDPA.

    python bench/cpu_decode_kernel.py [--batch 40] [--min-context 100] [--max-context 900]
                                      [--threads 1 2] [--repeats 7] [--baseline-rev ad5a9f4] [--all-lanes]
                                      [--dtype float32|bfloat16]

Shape: SmolLM2-135M attention by default (9 query heads, 3 KV heads, head_dim 64, block size 16),
contexts drawn uniformly from [min, max], block tables shuffled. Three implementations on the same
inputs: `old` (kernels/csrc/paged_decode_cpu.cpp at --baseline-rev, by default the commit that
added the C++ kernel, built with the same flags into its own extension in a temporary folder),
`new` (kernels/cpu_kernels.py, the working tree's source; with --all-lanes also its AVX2 and
plain C++ paths) and `sdpa` (kernels/sdpa_paged.py, the torch path where the kernel cannot be
built).

Timing: each call attends to the next of --layers separate caches (so K/V come from memory, as in a
model whose 30 layers each have their own cache, not from the 32 MiB L3), --calls calls per sample,
implementations interleaved within every repeat, median and min over --repeats. GB/s counts K/V
bytes read: sum of contexts x 2 x kv_heads x head_dim x element bytes. Before timing, every
implementation's output is checked against kernels/reference.py (float32, on the same numbers).
--dtype bfloat16: query, caches and output in bfloat16, as in a bfloat16 model; the baseline is
float32-only, so `old` is left out.

The machine has 2 cores: run it when nothing else does (another job skews every number).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Run as a script, this file's folder comes first on sys.path: put the repository root there.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from kernels import cpu_kernels, reference, sdpa_paged  # noqa: E402

_KERNEL_PATH = "kernels/csrc/paged_decode_cpu.cpp"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--min-context", type=int, default=100)
    p.add_argument("--max-context", type=int, default=900)
    p.add_argument("--num-q-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=8, help="separate caches, cycled through call by call")
    p.add_argument("--calls", type=int, default=16, help="calls per timed sample")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--baseline-rev", default="ad5a9f4",
                   help="git revision of the kernel source timed as `old` (default: the first C++ kernel)")
    p.add_argument("--no-old", action="store_true", help="skip the baseline build (no git, or no time)")
    p.add_argument("--all-lanes", action="store_true",
                   help="also time the new kernel's narrower instruction sets (new@8: AVX2, new@1: plain C++)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_baseline(rev: str):
    """The kernel source at `rev`, compiled with the same flags into an extension of its own."""
    from torch.utils.cpp_extension import load as load_extension

    source = subprocess.run(["git", "-C", _ROOT, "show", f"{rev}:{_KERNEL_PATH}"], check=True,
                            capture_output=True, text=True).stdout
    digest = hashlib.sha256((source + " ".join(cpu_kernels._FLAGS)).encode()).hexdigest()[:12]
    name = f"pagedserve_cpu_baseline_{digest}"
    folder = os.path.join(tempfile.gettempdir(), name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "paged_decode_cpu_baseline.cpp")
    with open(path, "w") as f:  # same text each time: the builder keeps its object files
        f.write(source)
    bin_dir = os.path.dirname(sys.executable)  # ninja may live in the virtualenv
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return load_extension(name, [path], extra_cflags=cpu_kernels._FLAGS, extra_ldflags=["-fopenmp"],
                          build_directory=folder, verbose=False)


def _at_lanes(module, lanes: int, query, key_cache, value_cache, tables, lens, scale) -> torch.Tensor:
    """The kernel with one instruction set; float32 result (its query and output are float32)."""
    result = torch.empty(query.shape)
    module.paged_decode_f32(result, query.float(), key_cache, value_cache, tables, lens, scale, lanes)
    return result


def make_inputs(args):
    gen = torch.Generator().manual_seed(args.seed)
    bs, hkv, d = args.block_size, args.num_kv_heads, args.head_dim
    lens = torch.randint(args.min_context, args.max_context + 1, (args.batch,), generator=gen, dtype=torch.int32)
    blocks = [-(-int(n) // bs) for n in lens]
    num_blocks = sum(blocks)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(args.batch, max(blocks), dtype=torch.int32)
    for b, n in enumerate(blocks):
        tables[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    dtype = getattr(torch, args.dtype)
    caches = [(torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype),
               torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)) for _ in range(args.layers)]
    query = torch.randn(args.batch, args.num_q_heads, d, generator=gen).to(dtype)
    return query, caches, tables, lens


def main(argv=None) -> int:
    args = parse_args(argv)
    if cpu_kernels.load() is None:
        print(f"the kernel did not build: {cpu_kernels.error()}", file=sys.stderr)
        return 1
    query, caches, tables, lens = make_inputs(args)
    scale = args.head_dim ** -0.5
    impls = {}
    if not args.no_old and args.dtype == "float32":
        old = load_baseline(args.baseline_rev)
        impls["old"] = lambda out, k, v: old.paged_decode_f32(out, query, k, v, tables, lens, scale)
    impls["new"] = lambda out, k, v: cpu_kernels.paged_decode_attention(out, query, k, v, tables, lens, scale)
    if args.all_lanes:
        module = cpu_kernels.load()
        for lanes in module.compiled_lanes()[1:]:
            impls[f"new@{lanes}"] = (lambda lanes: lambda out, k, v: out.copy_(_at_lanes(
                module, lanes, query, k, v, tables, lens, scale)))(lanes)
    impls["sdpa"] = lambda out, k, v: sdpa_paged.paged_decode_attention(out, query, k, v, tables, lens, scale)

    expected = torch.empty(query.shape)
    reference.paged_decode_attention(expected, query.float(), *(c.float() for c in caches[0]), tables, lens, scale)
    tolerance = 1e-4 if args.dtype == "float32" else 1e-2  # bfloat16 output: its rounding
    for name, fn in impls.items():
        got = torch.full_like(query, float("nan"))
        fn(got, *caches[0])
        print(f"{name}: max |diff| against the reference {(got.float() - expected).abs().max().item():.2e}")
        torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)

    element_bytes = caches[0][0].element_size()
    kv_bytes = int(lens.sum()) * 2 * args.num_kv_heads * args.head_dim * element_bytes
    print(f"batch {args.batch}, contexts {args.min_context}-{args.max_context} (mean {lens.float().mean():.0f}), "
          f"Hq {args.num_q_heads}, Hkv {args.num_kv_heads}, D {args.head_dim}, block {args.block_size}; "
          f"K/V read per call {kv_bytes / 2**20:.1f} MiB, {args.layers} caches of "
          f"{2 * caches[0][0].numel() * element_bytes / 2**20:.0f} MiB cycled, {args.dtype}")
    out = torch.empty_like(query)
    for threads in args.threads:
        torch.set_num_threads(threads)
        samples = {name: [] for name in impls}
        for name, fn in impls.items():  # warm-up: page in, thread pools up
            for i in range(args.layers):
                fn(out, *caches[i])
        for _ in range(args.repeats):
            for name, fn in impls.items():
                start = time.perf_counter()
                for i in range(args.calls):
                    fn(out, *caches[i % args.layers])
                samples[name].append((time.perf_counter() - start) / args.calls)
        print(f"\n{threads} thread(s): ms per call (median, min over {args.repeats} x {args.calls} calls), "
              "GB/s at the median")
        medians = {name: statistics.median(s) for name, s in samples.items()}
        for name, s in samples.items():
            line = (f"  {name:6s} {medians[name] * 1e3:8.3f} ms  (min {min(s) * 1e3:7.3f})  "
                    f"{kv_bytes / medians[name] / 1e9:6.1f} GB/s")
            if "old" in medians and name != "old":
                line += f"   {name}/old time {medians[name] / medians['old']:.3f}"
            print(line)
        if "sdpa" in medians:
            print(f"  new/sdpa time {medians['new'] / medians['sdpa']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
