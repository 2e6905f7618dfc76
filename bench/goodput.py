"""Goodput: completed requests per second that met every given service-level objective.

The flag is `vllm bench serve`'s: `--goodput ttft:500 tpot:100`, each item `METRIC:MILLISECONDS`,
METRIC one of ttft (time to first token), tpot (time per output token after the first) and
e2el (end-to-end latency). A request is good when each of its metrics is at most its SLO;
a request of one output token has no TPOT and meets any TPOT SLO (vLLM counts its TPOT as 0).
Failed requests are never good.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.metrics import RequestRecord

METRICS = ("ttft", "tpot", "e2el")


def slo_item(text: str) -> tuple[str, float]:
    """argparse type of one `METRIC:MS` item -> (metric, milliseconds)."""
    metric, sep, value = text.partition(":")
    if not sep or metric not in METRICS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected METRIC:MS with METRIC one of {', '.join(METRICS)}")
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number of milliseconds") from None
    if ms < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an SLO cannot be negative")
    return metric, ms


def slos_ms(items: list[tuple[str, float]] | None) -> dict[str, float]:
    """Parsed `--goodput` items -> {metric: ms}; a metric given twice keeps its last value."""
    return dict(items or [])


def _metrics_ms(record: RequestRecord) -> dict[str, float]:
    tpot = record.tpot_s()
    return {"ttft": record.ttft_s * 1000, "tpot": 0.0 if tpot is None else tpot * 1000, "e2el": record.e2e_s * 1000}


def meets(record: RequestRecord, slos: dict[str, float]) -> bool:
    """True when the request completed and each of its metrics is at most its SLO (ms)."""
    if not record.ok:
        return False
    values = _metrics_ms(record)
    return all(values[metric] <= limit for metric, limit in slos.items())


def goodput(records: list[RequestRecord], duration_s: float, slos: dict[str, float]) -> dict:
    """-> {"slo_ms": the SLOs, "good_requests": count, "requests_per_s": good ones over the run's seconds}."""
    good = sum(meets(r, slos) for r in records)
    return {"slo_ms": dict(slos), "good_requests": good, "requests_per_s": round(good / duration_s, 4)}
