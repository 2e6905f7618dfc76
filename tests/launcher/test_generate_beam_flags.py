"""`pagedserve generate --beam-width`: bad beam flags get one clear line and exit 2 before any
request, and the beam flags are in --help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args,message", [
    (["--beam-width", "2", "-n", "3"], "best_of (the beam width) must be in [n, 16]"),
    (["--beam-width", "40"], "best_of (the beam width) must be in [n, 16]"),
    (["--beam-width", "2", "--top-p", "0.5"], "use_beam_search cannot be combined with top_p"),
])
def test_bad_beam_flags_exit_2_naming_the_problem(args, message):
    proc = _generate(*args, "hi")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_beam_flags_are_documented():
    text = _generate("--help").stdout
    for flag in ("--beam-width", "--num-outputs", "--length-penalty", "--early-stopping"):
        assert flag in text


def test_session_key_flag_becomes_the_routing_affinity_key():
    import argparse

    from launcher.generate_cmd import add_arguments, sampling_params

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert sampling_params(parser.parse_args(["--session-key", "conv-7", "hi"])).session_key == "conv-7"
    assert sampling_params(parser.parse_args(["hi"])).session_key == ""
    proc = _generate("--session-key", "k" * 257, "hi")
    assert proc.returncode == 2 and "--session-key is longer than 256 characters" in proc.stderr
    assert "--session-key" in _generate("--help").stdout
