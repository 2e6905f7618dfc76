"""bench/kernels.py end to end on tiny shapes in Triton's interpreter (--interpret-smoke), and its
polite refusal without CUDA. No timing is asserted: only that it runs, agrees with SDPA and
writes the JSON the GPU session will commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "kernels.py")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_interpret_smoke_writes_results(tmp_path):
    out = tmp_path / "kernels.json"
    done = run("--interpret-smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["interpreted"] is True and result["triton"] and result["torch"] == torch.__version__
    assert "--interpret-smoke" in result["command"] and result["copy_gbps"] > 0
    (decode,), (prefill,) = result["decode"], result["prefill"]
    assert decode["gbps"] > 0 and decode["sdpa_gbps"] > 0 and decode["max_abs_diff_vs_sdpa"] < 1e-4
    assert prefill["tflops"] > 0 and prefill["sdpa_tflops"] > 0 and prefill["max_abs_diff_vs_sdpa"] < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda():
    done = run("--quick")
    assert done.returncode == 2
    assert "needs CUDA" in done.stderr and "--interpret-smoke" in done.stderr
