"""bench/decode_graphs.py at a tiny size in Triton's interpreter: it runs both modes and writes a
row per batch size (behaviour only: its times mean nothing on CPU)."""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton_*.py are imported


def test_decode_graphs_bench_writes_a_row_per_batch(tmp_path, capsys):
    from bench.decode_graphs import main

    out = tmp_path / "graphs.json"
    assert main(["--interpret-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 3]
    assert all(r["graphs_ms"] > 0 and r["eager_ms"] > 0 and r["padded_to"] >= r["batch"] for r in result["rows"])
    assert result["command"].endswith("bench/decode_graphs.py --interpret-smoke --out " + str(out))
    assert "eager/graphs" in capsys.readouterr().out
