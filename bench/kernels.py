"""Paged attention kernels against the physical limit and against torch SDPA, measured in one run.

    python bench/kernels.py [--quick] [--batch-sizes 1 4 16 64 256] [--contexts 512 ... 16384]
                            [--prefill-lens 512 ... 16384] [--dtype bfloat16] [--out FILE]
    python bench/kernels.py --interpret-smoke --out /tmp/smoke.json   # CI, no GPU

Decode: achieved GB/s = K/V bytes read (batch x context x 2 x kv_heads x head_dim x dtype bytes) /
median time, beside (a) the device's copy bandwidth, measured here as a large device-to-device
copy ((read + written bytes) / time), and (b) torch SDPA on the same K/V stored contiguously
(``[batch, kv_heads, context, head_dim]``, ``enable_gqa``). Prefill: causal FLOPs
(4 x q_heads x head_dim x L(L+1)/2 per sequence) / time, against SDPA ``is_causal`` on the same
lengths. Shapes: Llama-3-8B attention (32 q heads, 8 KV heads, head dim 128) by default.

Timing: CUDA events around each call, warmup calls first, the median of --reps; before every
timed call a 512 MiB buffer is overwritten so K/V never sit in L2 from the previous call (H100
L2: 50 MiB). Paged caches use a shuffled block table. Every configuration also checks the Triton
output against SDPA's (max abs difference, in the JSON). Writes JSON with the device, versions
and command line to bench/results/ (or --out). Without CUDA it exits 2 unless --interpret-smoke,
which runs tiny shapes in Triton's interpreter on CPU (wall-clock timer) to test this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# Run as a script, this file's folder comes first on sys.path and `import kernels` would find
# this very file: put the repository root there instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench.kernel_tables import print_tables  # noqa: E402

GIB = 1 << 30
FLUSH_BYTES = 512 << 20
TARGETS = {"decode_fraction_of_copy_at_64x4096": 0.85, "prefill_fraction_of_sdpa": 0.70}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--prefill-tokens", type=int, default=16384, help="tokens per prefill call (batch = this / len)")
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--max-gib", type=float, default=None, help="skip configurations needing more device memory "
                   "(default: 80%% of what is free)")
    p.add_argument("--quick", action="store_true", help="a small grid: batch 1 and 64, contexts 512 and 4096")
    p.add_argument("--interpret-smoke", action="store_true", help="tiny shapes in Triton's interpreter on CPU (CI)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.contexts, args.prefill_lens = [1, 64], [512, 4096], [1024, 4096]
    if args.interpret_smoke:
        args.batch_sizes, args.contexts, args.prefill_lens, args.prefill_tokens = [2], [40], [24], 48
        args.num_q_heads, args.num_kv_heads, args.head_dim, args.block_size = 4, 2, 32, 8
        args.dtype, args.warmup, args.reps = "float32", 1, 2
    return args


class Timer:
    """Median seconds of `fn` over reps, L2 flushed before each; CUDA events on a GPU, else wall clock."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps
        self.flush = torch.empty(FLUSH_BYTES if device.type == "cuda" else 1 << 20, dtype=torch.uint8, device=device)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
        return statistics.median(times)


def time_peer(timer: Timer, fn):
    """(seconds, output) of a peer (SDPA), or (None, None) if it runs out of memory: its math
    fallback may expand K/V per query head, which the paged kernels never do."""
    try:
        return timer(fn), fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def ratio(a, b):
    return None if a is None or b is None else a / b


def copy_bandwidth(timer: Timer, device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy of `nbytes`, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / seconds / 1e9


def paged_copy(contiguous: torch.Tensor, block_size: int, order: torch.Tensor) -> torch.Tensor:
    """``[batch, context, kv_heads, head_dim]`` -> a paged cache whose block ``order[i]`` holds
    the i-th block of the flattened sequences (so ``order.view(batch, -1)`` is the block table)."""
    batch, context = contiguous.shape[:2]
    blocks_per_seq = -(-context // block_size)
    pad = blocks_per_seq * block_size - context
    padded = F.pad(contiguous, (0, 0, 0, 0, 0, pad)) if pad else contiguous
    cache = torch.empty((batch * blocks_per_seq, block_size, *contiguous.shape[2:]), dtype=contiguous.dtype,
                        device=contiguous.device)
    cache[order] = padded.reshape(batch * blocks_per_seq, block_size, *contiguous.shape[2:])
    return cache


def random_kv(args, batch: int, context: int, device, dtype, gen: torch.Generator):
    """Contiguous K, V ``[batch, context, kv_heads, head_dim]``, their paged copies, the block table."""
    k = torch.randn(batch, context, args.num_kv_heads, args.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    blocks_per_seq = -(-context // args.block_size)
    order = torch.randperm(batch * blocks_per_seq, generator=gen).to(device)
    table = order.view(batch, blocks_per_seq).to(torch.int32)
    return k, v, paged_copy(k, args.block_size, order), paged_copy(v, args.block_size, order), table


def bench_decode(args, timer, device, dtype, batch, context, copy_gbps, gen):
    from kernels import triton_decode

    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    k, v, key_cache, value_cache, table = random_kv(args, batch, context, device, dtype, gen)
    q = torch.randn(batch, hq, d, device=device, dtype=dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    scale = d ** -0.5
    num_splits = triton_decode.choose_num_splits(batch, hkv, table.shape[1] * args.block_size, device)
    seconds = timer(lambda: triton_decode.paged_decode_attention(out, q, key_cache, value_cache, table,
                                                                 seq_lens, scale))
    del key_cache, value_cache
    kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    del k, v
    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], kt, vt, scale=scale, enable_gqa=True)

    sdpa_seconds, expected = time_peer(timer, sdpa)
    kv_bytes = 2 * batch * context * hkv * d * kt.element_size()
    error = None if expected is None else (out.float() - expected[:, :, 0].float()).abs().max().item()
    gbps, sdpa_gbps = kv_bytes / seconds / 1e9, ratio(kv_bytes / 1e9, sdpa_seconds)
    return {"batch": batch, "context": context, "num_splits": num_splits, "kv_bytes": kv_bytes,
            "ms": seconds * 1e3, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps,
            "sdpa_ms": ratio(sdpa_seconds, 1e-3), "sdpa_gbps": sdpa_gbps,
            "speedup_vs_sdpa": ratio(sdpa_seconds, seconds), "max_abs_diff_vs_sdpa": error}


def bench_prefill(args, timer, device, dtype, length, gen):
    """Fresh prompts of `length` tokens, batch = prefill_tokens // length, nothing cached before."""
    from kernels import triton_prefill

    hq, d = args.num_q_heads, args.head_dim
    batch = max(1, args.prefill_tokens // length)
    k, v, key_cache, value_cache, table = random_kv(args, batch, length, device, dtype, gen)
    q = torch.randn(batch, length, hq, d, device=device, dtype=dtype)
    flat_q, out = q.view(batch * length, hq, d), torch.empty(batch * length, hq, d, device=device, dtype=dtype)
    starts = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    scale = d ** -0.5
    seconds = timer(lambda: triton_prefill.paged_prefill_attention(
        out, flat_q, key_cache, value_cache, table, starts, seq_lens, scale, max_query_len=length))
    del key_cache, value_cache
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    del k, v
    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)

    sdpa_seconds, expected = time_peer(timer, sdpa)
    flops = 4 * batch * hq * d * length * (length + 1) // 2
    error = None if expected is None else \
        (out.view(batch, length, hq, d).float() - expected.transpose(1, 2).float()).abs().max().item()
    tflops, sdpa_tflops = flops / seconds / 1e12, ratio(flops / 1e12, sdpa_seconds)
    return {"length": length, "batch": batch, "flops": flops, "ms": seconds * 1e3, "tflops": tflops,
            "sdpa_ms": ratio(sdpa_seconds, 1e-3), "sdpa_tflops": sdpa_tflops,
            "fraction_of_sdpa": ratio(tflops, sdpa_tflops), "max_abs_diff_vs_sdpa": error}


def progress(done: int, total: int, label: str) -> None:
    """One redrawn line on stderr."""
    sys.stderr.write(f"\r  [{done:>3}/{total}] {label:<48}")
    sys.stderr.write("\n" if done == total else "")
    sys.stderr.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton_*.py are imported
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench/kernels.py measures GPU kernels and needs CUDA, which this machine lacks; "
              "use --interpret-smoke for a CPU smoke test of the script.", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    import triton

    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    timer = Timer(device, args.warmup, args.reps)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        limit = args.max_gib * GIB if args.max_gib else 0.8 * torch.cuda.mem_get_info(device)[0]
        name = torch.cuda.get_device_name(device)
    else:
        limit, name = float(GIB), f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"
    copy_gbps = copy_bandwidth(timer, device, 2 * GIB if device.type == "cuda" else 16 << 20)
    print(f"{name}: device-to-device copy {copy_gbps:.0f} GB/s (read + write)")

    decode_grid = [(b, c) for b in args.batch_sizes for c in args.contexts]
    total = len(decode_grid) + len(args.prefill_lens)
    decode, prefill, skipped = [], [], []
    for i, (batch, context) in enumerate(decode_grid):
        progress(i, total, f"decode batch {batch} context {context}")
        # At the peak two copies of K and V are alive (contiguous + paged, then + transposed).
        need = 2 * (2 * batch * context * args.num_kv_heads * args.head_dim * elem)
        if need > limit:
            skipped.append({"kind": "decode", "batch": batch, "context": context, "bytes_needed": need})
            continue
        decode.append(bench_decode(args, timer, device, dtype, batch, context, copy_gbps, gen))
    for j, length in enumerate(args.prefill_lens):
        progress(len(decode_grid) + j, total, f"prefill length {length}")
        tokens = max(1, args.prefill_tokens // length) * length
        need = 2 * tokens * (args.num_q_heads + 4 * args.num_kv_heads) * args.head_dim * elem
        if need > limit:
            skipped.append({"kind": "prefill", "length": length, "bytes_needed": need})
            continue
        prefill.append(bench_prefill(args, timer, device, dtype, length, gen))
    progress(total, total, "done")

    print_tables(decode, prefill)
    result = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else
        " ".join(["bench/kernels.py", *argv]),
        "interpreted": args.interpret_smoke, "dtype": args.dtype,
        "shapes": {"num_q_heads": args.num_q_heads, "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
                   "block_size": args.block_size},
        "timing": {"warmup": args.warmup, "reps": args.reps, "statistic": "median",
                   "l2_flush_bytes": timer.flush.numel()},
        "copy_gbps": copy_gbps, "targets": TARGETS, "decode": decode, "prefill": prefill, "skipped": skipped,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernels-{name.split(' (')[0].replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
