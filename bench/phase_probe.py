"""Where a decode step's time goes at a given batch size, measured through the running system.

`probe(address, batch)` sends `batch` requests of PROMPT_LEN tokens with OUTPUT_LEN tokens each,
all at once, and differences the server's `decode_phases` totals (scheduler/step_stats.py)
before and after at exactly that batch size: steps where all `batch` sequences decode.
"""

from __future__ import annotations

import asyncio
import random

from bench.driver import run_requests
from bench.workload import BenchRequest
from shared.client import AsyncClient

PROMPT_LEN = 128  # tokens
OUTPUT_LEN = 32  # tokens: every sequence decodes together for most of them
PHASES = ("schedule", "ipc", "prepare", "forward", "sample", "update")


async def _phase_totals(address: str) -> dict:
    async with AsyncClient(address) as client:
        return (await client.stats()).get("decode_phases", {})


def probe(address: str, batch: int = 64, vocab_size: int = 49152, seed: int = 0) -> dict:
    """-> per-step milliseconds of each phase at `batch`, the step time, and the overhead share
    (schedule + ipc + prepare + update over the step). Empty if no such step was seen."""
    rng = random.Random(seed)
    requests = [BenchRequest([rng.randrange(1, vocab_size) for _ in range(PROMPT_LEN)], OUTPUT_LEN)
                for _ in range(batch)]
    before = asyncio.run(_phase_totals(address)).get(str(batch), {})
    records = asyncio.run(run_requests(address, requests))[0]
    if failed := [r.error for r in records if not r.ok]:  # the driver records failures; here they void the probe
        raise RuntimeError(f"{len(failed)} of the probe's {batch} requests failed: {failed[0]}")
    after = asyncio.run(_phase_totals(address)).get(str(batch), {})
    steps = after.get("steps", 0) - before.get("steps", 0)
    if steps <= 0:
        return {}
    per_step = {f"{name}_ms": round(1000 * (after[name] - before.get(name, 0.0)) / steps, 3)
                for name in (*PHASES, "step")}
    overhead = sum(per_step[f"{name}_ms"] for name in ("schedule", "ipc", "prepare", "update"))
    return {"batch_size": batch, "steps": int(steps), **per_step,
            "overhead_share": round(overhead / per_step["step_ms"], 4) if per_step["step_ms"] else 0.0}
