"""Compile every Triton kernel for an NVIDIA target (default sm_90, H100) without a GPU.

    python tests/kernels/compile_for_gpu.py [--arch 90]

The interpreter does not lower kernels, so it misses what only the compiler checks: tl.dot
shape limits (every dim >= 16), operand dtypes, pointer casts, shared memory over the limit.
This runs Triton's real pipeline down to a cubin (the wheel ships ptxas) for the variants the
worker uses. It needs TRITON_INTERPRET unset, so tests run it as a subprocess. Prints one line
per variant (shared memory bytes) and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_cache_ops, triton_decode, triton_prefill  # noqa: E402

INT_POINTERS = {"block_tables": "*i32", "seq_lens": "*i32", "query_start_loc": "*i32", "slot_mapping": "*i64",
                "src_ptrs": "*i64", "dst_ptrs": "*i64", "src_ids": "*i64", "dst_ids": "*i64",
                "part_out": "*fp32", "part_lse": "*fp32"}
DATA_POINTERS = {"query", "key_cache", "value_cache", "out", "key", "value", "elem_ref"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """Argument types by name: data tensors `dtype`, index tensors their own, scalars i32/fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT_POINTERS:
            sig[name] = INT_POINTERS[name]
        elif name in DATA_POINTERS:
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if name.startswith("scale") else "i32"
    return sig


def variants():
    """(label, kernel, dtype, constexprs, num_warps, num_stages), for the dtypes the worker serves."""
    for dtype in ("bf16", "fp16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for group in (1, 4, 8) if dtype == "bf16" else (4,):  # the GQA padding matters, not the dtype
            for splits in (1, 8):
                c = dict(BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=64, BLOCK_D=128,
                         NUM_SPLITS=splits, DOT_PRECISION=precision, MIXED=splits > 1)
                yield f"decode {dtype} group {group} splits {splits}", triton_decode._decode_kernel, dtype, c, 4, 2
        c = dict(NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128, MIXED=True)
        yield f"decode reduce {dtype}", triton_decode._reduce_kernel, dtype, c, 4, 2
        for head_dim in (64, 128):
            block_m, block_n, warps, stages = triton_prefill._tiles(_Cuda(), head_dim)
            c = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, DOT_PRECISION=precision, SKIP_DECODES=True)
            yield f"prefill {dtype} head_dim {head_dim}", triton_prefill._prefill_kernel, dtype, c, warps, stages
        c = dict(BLOCK_H=8, BLOCK_D=128)
        yield f"reshape_and_cache {dtype}", triton_cache_ops._reshape_and_cache_kernel, dtype, c, 4, 2
        yield f"copy_blocks {dtype}", triton_cache_ops._copy_blocks_kernel, dtype, dict(BLOCK=4096), 4, 2


class _Cuda:
    type = "cuda"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    target, failed = GPUTarget("cuda", args.arch, 32), 0
    for label, fn, dtype, constexprs, warps, stages in variants():
        try:
            kernel = triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs), target=target,
                                    options={"num_warps": warps, "num_stages": stages})
            print(f"ok      {label}: {kernel.metadata.shared} bytes shared memory")
        except Exception as e:  # report every failing variant, not just the first
            failed += 1
            print(f"FAILED  {label}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
