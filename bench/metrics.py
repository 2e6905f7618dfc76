"""Per-request timings and the summary every engine's run is reported with.

Times are seconds from the start of the run. Metrics follow `vllm bench serve`:

* TTFT: first token's arrival - the request's send time.
* TPOT: (last token - first token) / (output tokens - 1), per request with > 1 token.
* ITL: gaps between consecutive arrivals of a request's tokens (a chunk of several
  tokens arriving at once is one gap).
* E2E: last token's arrival - send time.

Latencies are reported in milliseconds as mean, median, p90 and p99, over the requests that
completed; a failed request (an error from the server, a stream cut short) is counted in `failed`
and its first error messages are kept, so one bad request does not end the run. Request rates
count completed requests only, as `vllm bench serve` does. Goodput (bench/goodput.py) is added
when SLOs are given.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bench.goodput import goodput

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    prompt_len: int  # tokens
    sent_s: float
    token_times_s: list[float] = field(default_factory=list)  # arrival time of each output token
    num_output_tokens: int = -1  # -1: len(token_times_s)
    error: str | None = None  # why the request failed; None: it completed
    token_ids: list[int] = field(default_factory=list)  # the output, where the driver sees ids (not HTTP)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times_s)

    def __post_init__(self):
        if self.num_output_tokens < 0:
            self.num_output_tokens = len(self.token_times_s)

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.sent_s

    @property
    def e2e_s(self) -> float:
        return self.token_times_s[-1] - self.sent_s

    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.num_output_tokens - 1)

    def itls_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:]) if b > a]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    values = [v * 1000 for v in values_s]
    out = {"mean": sum(values) / len(values) if values else 0.0}
    out["median"] = percentile(values, 50)
    for q in PERCENTILES[1:]:
        out[f"p{q}"] = percentile(values, q)
    return {k: round(v, 3) for k, v in out.items()}


MAX_ERRORS_KEPT = 5  # distinct messages in a summary: enough to say what went wrong


def summarize(records: list[RequestRecord], duration_s: float, slos_ms: dict[str, float] | None = None) -> dict:
    """Throughputs (completed requests' tokens over the run's wall seconds), latency distributions,
    the failures and, with `slos_ms` (e.g. {"ttft": 500, "tpot": 100}), goodput."""
    done = [r for r in records if r.ok]
    output_tokens = sum(r.num_output_tokens for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)
    errors = Counter(r.error or "no tokens" for r in records if not r.ok)
    summary = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": [{"error": e, "count": n} for e, n in errors.most_common(MAX_ERRORS_KEPT)],
        "duration_s": round(duration_s, 3),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": round(len(done) / duration_s, 4),
        "output_tokens_per_s": round(output_tokens / duration_s, 3),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / duration_s, 3),
        "ttft_ms": distribution_ms([r.ttft_s for r in done]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot_s()) is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itls_s()]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done]),
    }
    if slos_ms:
        summary["goodput"] = goodput(done, duration_s, slos_ms)
    return summary
