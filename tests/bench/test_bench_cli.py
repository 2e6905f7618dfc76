"""`pagedserve bench` end to end at tiny sizes: behaviour and output format only, never timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TINY = ["--num-prompts", "3", "--dataset", "synthetic", "--max-output-len", "5", "--server-arg=--num-kv-blocks=64"]


def _bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher", "bench", *args, *TINY, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_throughput_against_both_peers(tmp_path):
    proc = _bench(tmp_path, "throughput", "--probe-batch", "4", "--tag", "tiny")
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert set(result["engines"]) == {"pagedserve", "transformers CB", "transformers static"}
    for name, engine in result["engines"].items():
        assert engine["num_requests"] == 3, name
        # Every engine ran every request to its own length (4 or 5 tokens).
        assert engine["output_tokens"] == result["engines"]["pagedserve"]["output_tokens"], name
        assert 12 <= engine["output_tokens"] <= 15, name
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(engine[metric]) == {"mean", "median", "p90", "p99"}, (name, metric)
    ours = result["engines"]["pagedserve"]
    assert ours["preemptions"] >= 0 and 0 < ours["kv_usage_peak"] <= 1
    phases = ours["phases"]
    assert phases["batch_size"] == 4 and phases["steps"] > 0
    assert phases["step_ms"] > 0 and 0 < phases["overhead_share"] < 1
    assert set(result["ratios"]) == {"pagedserve / transformers CB", "pagedserve / transformers static"}
    assert result["environment"]["torch"] and result["environment"]["cpu_count"]
    assert "ours / it" in proc.stdout and "overhead" in proc.stdout
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tiny-latency-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_sweep_of_rates(tmp_path):
    _bench(tmp_path, "serve", "--request-rate", "4", "8", "inf", "--burstiness", "0.5", "--tag", "tiny-serve",
           "--goodput", "ttft:600000", "tpot:600000")
    result = json.loads((tmp_path / "tiny-serve.json").read_text())
    assert list(result["rates"]) == ["4", "8", "inf"] and result["burstiness"] == 0.5
    assert result["backend"] == "zmq" and result["dtype"] == "float32"
    for rate in result["rates"].values():
        assert rate["num_requests"] == rate["completed"] == 3 and 12 <= rate["output_tokens"] <= 15
        assert rate["failed"] == 0 and rate["goodput"]["good_requests"] == 3  # an SLO of 10 minutes
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tiny-serve-rates.png").exists() and (tmp_path / "tiny-serve-latency-cdf.png").exists()


def test_random_weights_of_a_preset_shape(tmp_path):
    """The path a GPU run takes (a Llama-3-8B shape there): config-only model directory, the
    server on --load-format dummy, the peer built from the config."""
    _bench(tmp_path, "throughput", "--random-weights", "tiny", "--peers", "cb", "--probe-batch", "0",
           "--tag", "tiny-random", "--no-plots")
    result = json.loads((tmp_path / "tiny-random.json").read_text())
    assert result["random_weights"] and result["model"] == "tiny"
    assert set(result["engines"]) == {"pagedserve", "transformers CB"}
    tokens = {name: engine["output_tokens"] for name, engine in result["engines"].items()}
    assert len(set(tokens.values())) == 1 and 12 <= tokens["pagedserve"] <= 15
    assert (tmp_path / "model-tiny" / "config.json").exists()
    assert not list((tmp_path / "model-tiny").glob("*.safetensors"))
