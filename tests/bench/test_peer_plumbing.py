"""`pagedserve bench ... --peers vllm,llamacpp,http` at a tiny size, with stand-ins for vLLM and
llama-server (tests/bench/fake_peers): the setup reuse, the weight export, the GGUF conversion,
starting and stopping a peer's server, driving it, and the report. The real peers are
benchmarks, not tests (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_peers")
TINY = ["--random-weights", "tiny", "--num-prompts", "3", "--dataset", "synthetic", "--max-output-len", "5",
        "--server-arg=--num-kv-blocks=64", "--no-plots"]


def _script(path, body: str) -> str:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def fake_peers(tmp_path):
    """-> the environment that points the bench at the stand-ins, with the peer cache in tmp_path."""
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    shutil.copy(os.path.join(FAKES, "convert_hf_to_gguf.py"), tree)
    _script(tree / "build" / "bin" / "llama-server",
            f'exec "{sys.executable}" "{os.path.join(FAKES, "llama_server.py")}" "$@"')
    python = _script(tmp_path / "vllm-python", f'PYTHONPATH="{FAKES}" exec "{sys.executable}" "$@"')
    return {**os.environ, "PAGEDSERVE_PEER_CACHE": str(tmp_path / "cache"), "PAGEDSERVE_VLLM_PYTHON": python,
            "PAGEDSERVE_LLAMA_CPP_DIR": str(tree)}


def _bench(tmp_path, env, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher", "bench", *args, *TINY, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_throughput_against_vllm_and_llamacpp(tmp_path, fake_peers):
    proc = _bench(tmp_path, fake_peers, "throughput", "--peers", "vllm,llamacpp", "--probe-batch", "0",
                  "--tag", "peers")
    result = json.loads((tmp_path / "out" / "peers.json").read_text())
    assert set(result["engines"]) == {"pagedserve", "vLLM", "llama.cpp"} and result["unavailable"] == {}
    for name, engine in result["engines"].items():
        assert engine["completed"] == 3 and engine["output_tokens"] == result["engines"]["pagedserve"]["output_tokens"]
    assert set(result["ratios"]) == {"pagedserve / vLLM", "pagedserve / llama.cpp"}
    assert result["engines"]["vLLM"]["version"] == "0.0.fake"
    llama = result["engines"]["llama.cpp"]
    assert "llama-server" in llama["command"][0] and "version" in llama
    assert result["engines"]["vLLM"]["settings"]["enable_prefix_caching"] is False
    # The stand-in repeats the prompt's first token: compared request by request, it differs from ours.
    agreement = result["greedy_agreement"]["vLLM"]
    assert (agreement["identical"], agreement["compared"], len(agreement["first_difference"])) == (0, 3, 3)
    assert agreement["tokens"] == result["engines"]["pagedserve"]["output_tokens"]
    assert agreement["prefix_tokens_equal"] == sum(agreement["first_difference"])
    assert "greedy tokens identical to pagedserve's on 0 of 3" in proc.stdout
    # The export and the GGUF are made once, in the cache, from our weights.
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir() if p.suffix == ".gguf") == ["model-tiny-float32-f32.gguf"]


def test_serve_sweep_reports_an_unavailable_peer_and_runs_the_others(tmp_path, fake_peers):
    env = {**fake_peers, "PAGEDSERVE_VLLM_PYTHON": str(tmp_path / "no-such-python")}
    proc = _bench(tmp_path, env, "serve", "--peers", "http,vllm,llamacpp", "--request-rate", "8", "inf",
                  "--tag", "serve-peers")
    result = json.loads((tmp_path / "out" / "serve-peers.json").read_text())
    assert list(result["engines"]) == ["pagedserve", "pagedserve HTTP", "llama.cpp"]
    for name, engine in result["engines"].items():
        assert list(engine["rates"]) == ["8", "inf"], name
        assert all(run["completed"] == 3 and run["failed"] == 0 for run in engine["rates"].values()), name
    assert "no-such-python" in result["unavailable"]["vLLM"]
    assert "vLLM: UNAVAILABLE" in proc.stdout
    assert set(result["p99_tpot_no_worse"]) == {"pagedserve HTTP", "llama.cpp"}
    assert "--alias" in result["engines"]["llama.cpp"]["server"]["command"]


def test_greedy_agreement_reports_where_each_differing_request_first_differs():
    from types import SimpleNamespace

    from bench.peer_runs import greedy_agreement

    ours = [SimpleNamespace(ok=True, token_ids=ids) for ids in ([1, 2, 3], [1, 2, 3], [4, 5], [7])]
    ours.append(SimpleNamespace(ok=False, token_ids=[9]))  # a failed request is not compared
    theirs = [[1, 2, 3], [1, 9, 3], [4], [8], [9]]
    assert greedy_agreement(ours, theirs) == {"identical": 1, "compared": 4, "first_difference": [1, 1, 0],
                                              "differing_requests": [1, 2, 3], "prefix_tokens_equal": 5, "tokens": 9}


def test_vllm_runs_greedy_to_the_length_without_masking_eos():
    """vLLM's min_tokens masks EOS's logit even with ignore_eos: set, it made vLLM's greedy rows avoid
    EOS where pagedserve and transformers pick it, and differ from there (half the requests)."""
    from types import SimpleNamespace

    from bench.vllm_offline import _sampling

    params = _sampling(lambda **kwargs: kwargs, SimpleNamespace(DELTA="delta"), 17)
    assert params["max_tokens"] == 17 and params["ignore_eos"] is True and params["temperature"] == 0.0
    assert params.get("min_tokens", 0) == 0
