"""PNG plots of a benchmark run (matplotlib, the `bench` extra; skipped with a note without it).

* throughput: the CDF of end-to-end latency and of TTFT for every engine.
* serve: output throughput and p99 TTFT against the request rate, and the latency CDF per rate.
"""

from __future__ import annotations

import math
import sys

from bench.metrics import RequestRecord


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'pagedserve[bench]'): no plots", file=sys.stderr)
        return None
    return plt


def _cdf(ax, values: list[float], label: str) -> None:
    ordered = sorted(values)
    if ordered:
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)


def _latency_cdfs(plt, path: str, series: dict[str, list[RequestRecord]], title: str) -> str:
    fig, (ttft, e2e) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in series.items():
        done = [r for r in records if r.ok]
        _cdf(ttft, [r.ttft_s for r in done], name)
        _cdf(e2e, [r.e2e_s for r in done], name)
    for ax, what in ((ttft, "time to first token (s)"), (e2e, "end-to-end latency (s)")):
        ax.set_xlabel(what)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rate_curves(plt, path: str, by_rate: dict[str, dict], engine: str) -> str:
    finite = [(float(rate), s) for rate, s in by_rate.items() if not math.isinf(float(rate))]
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [rate for rate, _ in finite]
    tput.plot(xs, [s["output_tokens_per_s"] for _, s in finite], marker="o")
    ttft.plot(xs, [s["ttft_ms"]["p99"] / 1000 for _, s in finite], marker="o")
    tput.set_ylabel("output tokens/s")
    ttft.set_ylabel("p99 TTFT (s)")
    for ax in (tput, ttft):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{engine} under Poisson arrivals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(mode: str, stem: str, result: dict, records: dict[str, list[RequestRecord]]) -> list[str]:
    """-> paths written (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    # An HTTP server's dtype is its own (not known here): its address names it instead.
    served = result.get("dtype") or result.get("base_url", "")
    title = f"{result['num_prompts']} {result['source']} requests, {result['model']} {served}"
    if mode == "throughput":
        return [_latency_cdfs(plt, stem + "-latency-cdf.png", records, title)]
    written = [_latency_cdfs(plt, stem + "-latency-cdf.png", {f"{r} req/s": v for r, v in records.items()}, title)]
    if sum(not math.isinf(float(rate)) for rate in result["rates"]) >= 2:
        engine = result["base_url"] if result.get("backend") == "openai" else "pagedserve"
        written.append(_rate_curves(plt, stem + "-rates.png", result["rates"], engine))
    return written
