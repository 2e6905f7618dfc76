"""The CLI as a new user meets it: one clear line and exit 2 for a mistake, help that says what
each flag takes, and no traceback anywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher.client_io import address_problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pagedserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["generate", "stats"])
@pytest.mark.parametrize("address, advice", [
    ("http://127.0.0.1:8765", "--server tcp://127.0.0.1:8765"),
    ("127.0.0.1:8765", "--server tcp://127.0.0.1:8765"),
    ("localhost", "tcp://HOST:PORT"),
])
def test_a_wrong_server_address_says_what_to_type(command, address, advice):
    args = [command, "--server", address] + (["hi"] if command == "generate" else [])
    proc = pagedserve(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert advice in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_good_addresses_pass():
    assert address_problem("tcp://127.0.0.1:8765") is None and address_problem("ipc:///run/x.sock") is None


@pytest.mark.parametrize("value", ["-1", "-3", "0"])
def test_generate_names_max_tokens(value):
    proc = pagedserve("generate", "--max-tokens", value, "hi")
    assert proc.returncode == 2 and f"max_tokens must be >= 1, got {value}" in proc.stderr


def test_generate_structured_flags_are_checked_before_any_request(tmp_path):
    bad_schema = tmp_path / "schema.json"
    bad_schema.write_text("{not json")
    not_json = "structured_outputs: json: the schema is not valid JSON"
    for args, message in [(("--json-schema", str(bad_schema)), not_json),
                          (("--json-schema", str(tmp_path / "missing.json")), "No such file"),
                          (("--regex", "[0-9]+", "--choice", "a"), "set exactly one of"),
                          (("--choice", "a", "--choice", ""), "every choice must be a non-empty string")]:
        proc = pagedserve("generate", *args, "hi")
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_missing_model_is_one_line_before_any_role_starts(tmp_path):
    missing = str(tmp_path / "nonexistent")
    for role in ("serve", "worker", "frontend"):
        proc = pagedserve(role, "--model", missing, "--run-dir", str(tmp_path / "run"))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (f"pagedserve {role}: no model at {missing}: no such directory or .gguf "
                                       f"file; models are never downloaded")
        assert proc.stdout == ""  # no role started: no JSON event at all
    assert not (tmp_path / "run").exists()


def test_help_lists_every_subcommand_and_what_each_flag_takes():
    top = pagedserve("--help").stdout
    for command in ("serve", "scheduler", "worker", "frontend", "generate", "stats", "keygen", "build-kernels",
                    "bench"):
        assert command in top
    serve = pagedserve("serve", "--help").stdout
    assert " X " not in serve and " X\n" not in serve
    assert "--swap-space-gib GIB" in serve and "--preemption-mode {recompute,swap}" in serve
    assert "(default: 128)" in serve and "--pid-file FILE" in serve and "[worker]" in serve
    preemption_help = serve.split("--preemption-mode {recompute,swap}\n")[-1][:300]
    assert "--swap-space-gib" in preemption_help  # the hint names the real flag
    generate = pagedserve("generate", "--help").stdout
    for flag in ("--max-tokens TOKENS", "--temperature T", "--top-p P", "--top-k K", "--seed N",
                 "--wait SECONDS", "--json", "--raw"):
        assert flag in generate


def test_an_enum_error_lists_the_valid_values():
    proc = pagedserve("serve", "--dtype", "float8")
    assert proc.returncode == 2 and "float8" in proc.stderr and "'float32', 'bfloat16', 'float16'" in proc.stderr


def test_stats_table_shows_each_key_once():
    from launcher.stats_cmd import format_table

    table = format_table({"status": "ok", "workers_ready": 1, "workers_expected": 1},
                         {"workers_ready": 1, "running": 0, "kv_blocks_used": 3, "kv_blocks_total": 12})
    keys = [line.split()[0] for line in table.splitlines()]
    assert keys.count("workers_ready") == 1 and "kv_blocks" in keys and "running" in keys


def test_an_open_non_loopback_http_listener_stops_serve_before_any_role(tmp_path):
    proc = pagedserve("serve", "--http-listen", "0.0.0.0:8000", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and proc.stdout == "" and "--api-key-file" in proc.stderr
    assert not (tmp_path / "run").exists()
