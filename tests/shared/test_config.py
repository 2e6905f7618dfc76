"""One TOML file for every role, flags on top, and start-up stops on a bad key or value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher.cli import build_parser, config_from_args
from shared.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "systemd", "pagedserve.toml")


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "pagedserve.toml"
    path.write_text(text)
    return str(path)


def test_file_values_then_flags_override(tmp_path):
    path = _write(tmp_path, 'block_size = 32\nmax_num_seqs = 8\ndrain_timeout_s = 5\nlisten = "tcp://0.0.0.0:9"\n')
    args = build_parser().parse_args(["worker", "--config", path, "--max-num-seqs", "4", "--drain-timeout", "7.5"])
    config = config_from_args(args)
    assert (config.worker.block_size, config.scheduler.max_num_seqs, config.operations.drain_timeout_s) == (32, 4, 7.5)
    assert config.endpoints.listen == "tcp://0.0.0.0:9"


@pytest.mark.parametrize("text, named", [
    ("block_sise = 16\n", "block_sise"),  # a typo is not silently ignored
    ('block_size = "big"\n', "block_size"),
    ("block_size = 24\n", "block_size"),  # not a power of two
    ('dtype = "float8"\n', "dtype"),
    ("drain_timeout_s = -1\n", "drain_timeout_s"),
    ('load_format = "pickle"\n', "load_format"),
    ('attention_backend = "cuda"\n', "attention_backend"),
    ("[scheduler]\nmax_num_seqs = 4\n", "scheduler"),  # flat: no tables
])
def test_bad_key_or_value_is_named(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named):
        load_config(_write(tmp_path, text))


def test_bad_flag_value_is_named():
    with pytest.raises(ConfigError, match="max_num_seqs"):
        load_config(None, {"max_num_seqs": "many"})


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "block_size = \n"))


def test_every_role_refuses_to_start_on_a_bad_config(tmp_path):
    path = _write(tmp_path, "max_num_seqs = 4\nnot_a_setting = 1\n")
    for role in ("serve", "scheduler", "worker", "frontend"):
        proc = subprocess.run([sys.executable, "-m", "launcher", role, "--config", path], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "not_a_setting" in proc.stderr
        assert proc.stdout == ""  # stdout carries JSON events only


def test_the_example_file_is_valid():
    config = load_config(EXAMPLE)
    assert config.endpoints.run_dir == "/run/pagedserve"  # the units' RuntimeDirectory
