"""bench/kernels.py's tables: ratios in the same run, as text."""

from __future__ import annotations


def fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_tables(decode, prefill) -> None:
    """Ratios are what matter (same run, same device); '-' where SDPA ran out of memory."""
    if decode:
        print(f"{'batch':>6} {'context':>8} {'splits':>6} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'SDPA GB/s':>10} "
              f"{'vs SDPA':>8}")
        for r in decode:
            print(f"{r['batch']:>6} {r['context']:>8} {r['num_splits']:>6} {r['ms']:>9.3f} {r['gbps']:>8.0f} "
                  f"{r['fraction_of_copy']:>8.1%} {fmt(r['sdpa_gbps'], '.0f', 10)} "
                  f"{fmt(r['speedup_vs_sdpa'], '.2f', 7)}x")
    if prefill:
        print(f"{'length':>7} {'batch':>6} {'ms':>9} {'TFLOP/s':>8} {'SDPA':>8} {'of SDPA':>8}")
        for r in prefill:
            print(f"{r['length']:>7} {r['batch']:>6} {r['ms']:>9.3f} {r['tflops']:>8.1f} "
                  f"{fmt(r['sdpa_tflops'], '.1f', 8)} {fmt(r['fraction_of_sdpa'], '.1%', 8)}")
