"""The CLI against a running server, as a user runs it: `--pid-file` names exactly this server,
`generate --json` carries the finish reason, `--json-schema` shapes the answer, `--beam-width` prints
the best hypotheses with their scores, an answer cut short by a drain exits non-zero and says so,
and `stats` into a closed pipe exits quietly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from server_process import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "launcher"]


@pytest.mark.slow
def test_pid_file_json_answer_closed_pipe_and_a_cut_short_answer(tmp_path):
    pid_file = tmp_path / "serve.pid"
    srv = ServerProcess(str(tmp_path / "run"), "--pid-file", str(pid_file), "--drain-timeout", "60")
    try:
        assert int(pid_file.read_text()) == srv.procs[0].pid  # the supervisor: `kill $(cat FILE)` stops it

        answer = subprocess.run([*CLI, "generate", "--server", srv.address, "--json", "--max-tokens", "16",
                                 "What is the capital of France?"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert answer.returncode == 0, answer.stderr
        out = json.loads(answer.stdout)
        assert out["text"].startswith("The capital of France is Paris") and out["finish_reason"] == "stop"

        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                  "required": ["city"], "additionalProperties": False}
        (tmp_path / "schema.json").write_text(json.dumps(schema))
        shaped = subprocess.run([*CLI, "generate", "--server", srv.address, "--json", "--json-schema",
                                 str(tmp_path / "schema.json"), "What is the capital of France?"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert shaped.returncode == 0, shaped.stderr
        assert set(json.loads(json.loads(shaped.stdout)["text"])) == {"city"}

        beams = subprocess.run([*CLI, "generate", "--server", srv.address, "--json", "--max-tokens", "8",
                                "--beam-width", "3", "-n", "2", "What is the capital of France?"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert beams.returncode == 0, beams.stderr
        outputs = json.loads(beams.stdout)["outputs"]  # best first, each with its score
        assert len(outputs) == 2 and outputs[0]["beam_score"] >= outputs[1]["beam_score"]

        piped = subprocess.run(f"{sys.executable} -m launcher stats --json --server {srv.address} | head -c 10; "
                               f"exit ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash", cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert piped.returncode == 0 and "Traceback" not in piped.stderr and piped.stderr == ""
        assert len(piped.stdout) == 10

        long = subprocess.Popen([*CLI, "generate", "--server", srv.address, "--max-tokens", "4000", "--ignore-eos",
                                 "--raw", "Once upon a time"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert long.stdout.read(20)  # it streams
        os.kill(int(pid_file.read_text()), signal.SIGTERM)  # drain ...
        srv.wait_for("frontend.draining", timeout_s=30)
        os.kill(int(pid_file.read_text()), signal.SIGTERM)  # ... and a second signal: abort now
        _, err = long.communicate(timeout=120)
        assert long.returncode == 1
        assert "cut short (finish_reason abort)" in err
        assert srv.procs[0].wait(120) == 0
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_file.exists()  # removed on exit: a stale file never names another process
    finally:
        srv.stop()
