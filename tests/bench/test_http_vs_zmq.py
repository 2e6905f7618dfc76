"""`pagedserve bench http-vs-zmq` end to end at a tiny size: one server, both paths, the frontend's
CPU per token; behaviour and output format only, never timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

pytest.importorskip("aiohttp")


def test_both_paths_on_one_server(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "bench", "http-vs-zmq", "--num-prompts", "4", "--max-output-len", "4",
         "--max-concurrency", "4", "--warmup-prompts", "2", "--dataset", "synthetic", "--order", "openai", "zmq",
         "--server-arg=--num-kv-blocks=128", "--out", str(tmp_path), "--tag", "tiny"],
        check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["order"] == ["openai", "zmq"] and result["max_concurrency"] == 4
    assert any(flag.startswith("127.0.0.1:") for flag in result["server_flags"])  # --http-listen's value
    paths = result["paths"]
    assert set(paths) == {"zmq", "openai"}
    for name, run in paths.items():
        assert run["num_requests"] == run["completed"] == 4 and run["failed"] == 0, (name, run["errors"])
        # Both paths ran the same requests to the same lengths; the scheduler saw exactly those tokens.
        assert run["output_tokens"] == paths["zmq"]["output_tokens"] and 12 <= run["output_tokens"] <= 16
        assert run["tokens_generated"] == run["output_tokens"], name
        assert run["frontend_cpu_s"] > 0 and run["frontend_cpu_ms_per_token"] > 0, name
        assert run["client_cpu_ms_per_token"] > 0, name
        for metric in ("ttft_ms", "tpot_ms"):
            assert set(run[metric]) == {"mean", "median", "p90", "p99"}, (name, metric)
    ratios = result["ratios"]
    assert ratios["output_tokens_per_s"] > 0 and ratios["frontend_cpu_ms_per_token"] > 0
    assert ratios["throughput_target"] == 0.95 and isinstance(ratios["throughput_within_target"], bool)
    assert result["environment"]["cpu_count"] and result["server_models"]["data"]
    assert "openai / zmq" in proc.stdout and "CPU ms/tok" in proc.stdout
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tiny-latency-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
