"""bench/cpu_linear.py at a tiny size: it runs and writes its rows (behaviour only, no timing)."""

import json

import pytest

from worker.cpu_linear import onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def test_cpu_linear_bench_writes_a_row_per_token_count(tmp_path, capsys):
    from bench.cpu_linear import main

    out = tmp_path / "linear.json"
    assert main(["--tokens", "1", "3", "--hidden", "32", "--intermediate", "48", "--heads", "2", "--kv-heads", "1",
                 "--head-dim", "16", "--layers", "2", "--vocab", "100", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 3]
    assert all(r[k] > 0 for r in rows for k in ("layers_torch_ms", "layers_onednn_ms", "head_torch_ms", "head_onednn_ms"))
    assert "layers oneDNN" in capsys.readouterr().out
