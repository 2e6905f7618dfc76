"""What a benchmark run writes: the environment it ran in, JSON results, a table with ratios."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata


def environment(device: str) -> dict:
    """Machine, device and library versions, so a result names what produced it."""
    # `pagedserve bench ...` and `python -m launcher bench ...` run the same thing: name it once.
    via_cli = os.path.basename(sys.argv[0]) in ("pagedserve", "cli.py")
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "command": " ".join(["pagedserve", *sys.argv[1:]]) if via_cli else " ".join(sys.argv)}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    for package in ("torch", "transformers", "triton", "pagedserve"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if device.startswith("cuda"):
        import torch

        env["device"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["device"] = env.get("cpu", "cpu")
    return env


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def _extra_header(runs) -> str:
    """Goodput and failure columns, shown only when a run has them (SLOs given, requests failed)."""
    goodput = any("goodput" in s for s in runs)
    failed = any(s.get("failed") for s in runs)
    return (f"{'good req/s':>11}" if goodput else "") + (f"{'failed':>8}" if failed else "")


def _extra_cells(runs, s: dict) -> str:
    goodput = any("goodput" in r for r in runs)
    failed = any(r.get("failed") for r in runs)
    cells = ""
    if goodput:
        cells += f"{s['goodput']['requests_per_s']:>11.3f}" if "goodput" in s else f"{'-':>11}"
    return cells + (f"{s.get('failed', 0):>8}" if failed else "")


def throughput_table(engines: dict[str, dict], baseline: str = "pagedserve") -> str:
    """One row per engine: throughputs, latencies, and the baseline's output tok/s as a multiple of
    each (pagedserve, or the HTTP server driven with --backend openai)."""
    runs = list(engines.values())
    rows = [f"{'engine':<26}{'out tok/s':>10}{'total tok/s':>12}{'req/s':>8}{'TTFT p50 ms':>12}"
            f"{'TPOT p50 ms':>12}{'E2E p99 s':>10}{'ours / it':>10}" + _extra_header(runs)]
    ours = engines[baseline]["output_tokens_per_s"] if baseline in engines else None
    for name, s in engines.items():
        ratio = f"{ours / s['output_tokens_per_s']:.2f}x" if ours and s["output_tokens_per_s"] else "-"
        rows.append(f"{name:<26}{s['output_tokens_per_s']:>10.1f}{s['total_tokens_per_s']:>12.1f}"
                    f"{s['requests_per_s']:>8.3f}{s['ttft_ms']['median']:>12.0f}{s['tpot_ms']['median']:>12.1f}"
                    f"{s['e2e_ms']['p99'] / 1000:>10.1f}{ratio:>10}" + _extra_cells(runs, s))
    return "\n".join(rows)


def serve_table(by_rate: dict[str, dict]) -> str:
    """One row per request rate; KV peak and preemptions are "-" for an HTTP server (no stats)."""
    runs = list(by_rate.values())
    rows = [f"{'rate req/s':>10}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
            f"{'ITL p99':>9}{'E2E p99':>10}{'KV peak':>9}{'preempt':>9}" + _extra_header(runs) + "   (ms)"]
    for rate, s in by_rate.items():
        kv = f"{s['kv_usage_peak']:>9.0%}" if "kv_usage_peak" in s else f"{'-':>9}"
        rows.append(f"{rate:>10}{s['output_tokens_per_s']:>10.1f}{s['ttft_ms']['median']:>10.0f}"
                    f"{s['ttft_ms']['p99']:>10.0f}{s['tpot_ms']['median']:>10.1f}{s['itl_ms']['p99']:>9.0f}"
                    f"{s['e2e_ms']['p99']:>10.0f}{kv}{s.get('preemptions', '-'):>9}" + _extra_cells(runs, s))
    return "\n".join(rows)


def slo_line(slos_ms: dict[str, float]) -> str:
    """What the goodput column counts, e.g. `goodput: completed requests/s with ttft <= 500 ms`."""
    return "good req/s: completed requests per second with " + " and ".join(
        f"{metric} <= {limit:g} ms" for metric, limit in slos_ms.items())


def failure_lines(runs: dict[str, dict]) -> list[str]:
    """One line per run with failed requests, with its most common errors."""
    lines = []
    for name, s in runs.items():
        if s.get("failed"):
            errors = "; ".join(f"{e['error']} (x{e['count']})" for e in s.get("errors", []))
            lines.append(f"{name}: {s['failed']} of {s['num_requests']} requests failed: {errors}")
    return lines


def phases_table(phases: dict) -> str:
    """Per-phase decode step time at the largest batch measured (see scheduler/step_stats.py)."""
    if not phases:
        return "(no decode phases reported)"
    rows = [f"decode step at batch {phases['batch_size']} ({phases['steps']} steps), per step:"]
    step = phases["step_ms"]
    for name in ("schedule_ms", "ipc_ms", "prepare_ms", "forward_ms", "sample_ms", "update_ms"):
        rows.append(f"  {name[:-3]:<10}{phases[name]:>9.2f} ms  {phases[name] / step:>6.1%}")
    rows.append(f"  {'step':<10}{step:>9.2f} ms")
    rows.append(f"  overhead (schedule + ipc + prepare + update): {phases['overhead_share']:.1%} of the step")
    return "\n".join(rows)
