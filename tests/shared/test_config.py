"""One TOML file for every role, flags on top, and start-up stops on a bad key or value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher.cli import build_parser
from launcher.flags import config_from_args
from shared.config import FIELD_SECTIONS, ServerConfig
from shared.config_file import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "systemd", "pagedserve.toml")


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "pagedserve.toml"
    path.write_text(text)
    return str(path)


def test_file_values_then_flags_override(tmp_path):
    path = _write(tmp_path, '[worker]\nblock_size = 32\n[scheduler]\nmax_num_seqs = 8\n[operations]\n'
                            'drain_timeout_s = 5\n[endpoints]\nlisten = "tcp://0.0.0.0:9"\n')
    args = build_parser().parse_args(["worker", "--config", path, "--max-num-seqs", "4", "--drain-timeout", "7.5"])
    config = config_from_args(args)
    assert (config.worker.block_size, config.scheduler.max_num_seqs, config.operations.drain_timeout_s) == (32, 4, 7.5)
    assert config.endpoints.listen == "tcp://0.0.0.0:9"


@pytest.mark.parametrize("text, named", [
    ("[worker]\nblock_sise = 16\n", "block_sise"),  # a typo is not silently ignored
    ('[worker]\nblock_size = "big"\n', "block_size"),
    ("[worker]\nblock_size = 24\n", "block_size"),  # not a power of two
    ('[worker]\ndtype = "float8"\n', "dtype"),
    ("[operations]\ndrain_timeout_s = -1\n", "drain_timeout_s"),
    ('[worker]\nload_format = "pickle"\n', "load_format"),
    ('[worker]\nattention_backend = "cuda"\n', "attention_backend"),
    ("[scheduler]\nblock_size = 16\n", "block_size"),  # in the wrong table
    ("[sheduler]\nmax_num_seqs = 4\n", "sheduler"),  # no such table
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
    path = _write(tmp_path, "[scheduler]\nmax_num_seqs = 4\nnot_a_setting = 1\n")
    for role in ("serve", "scheduler", "worker", "frontend"):
        proc = subprocess.run([sys.executable, "-m", "launcher", role, "--config", path], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "not_a_setting" in proc.stderr
        assert proc.stdout == ""  # stdout carries JSON events only


def test_the_example_file_is_valid():
    config = load_config(EXAMPLE)
    assert config.endpoints.run_dir == "/run/pagedserve"  # the units' RuntimeDirectory


@pytest.mark.parametrize("key, value, section", [("block_size", "16", "worker"), ("max_num_seqs", "8", "scheduler"),
                                                 ("listen", '"tcp://127.0.0.1:1"', "endpoints"),
                                                 ("drain_timeout_s", "5.0", "operations")])
def test_an_old_flat_key_names_its_new_table(tmp_path, key, value, section):
    with pytest.raises(ConfigError, match=rf"{key}.*{section}\.{key}.*\[{section}\]"):
        load_config(_write(tmp_path, f"{key} = {value}\n"))


def test_every_field_has_a_flag_with_help_and_its_default():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest: a for a in serve._actions}
    for name in FIELD_SECTIONS:
        action = flags[name]
        assert action.help and action.metavar and action.metavar != "X", name
    assert "(default: 16)" in flags["block_size"].help and "(default: 128)" in flags["max_num_seqs"].help
    assert flags["dtype"].choices == ("auto", "float32", "bfloat16", "float16")


def test_an_enum_flag_lists_the_valid_values():
    proc = subprocess.run([sys.executable, "-m", "launcher", "serve", "--dtype", "float8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "float8" in proc.stderr and "bfloat16" in proc.stderr


def test_settings_by_field_name_and_validation_of_choices():
    config = ServerConfig.from_settings(block_size=8, max_num_seqs=3, dtype="bfloat16")
    assert (config.worker.block_size, config.scheduler.max_num_seqs, config.worker.dtype) == (8, 3, "bfloat16")
    assert config.replace(block_size=32).worker.block_size == 32 and config.worker.block_size == 8
    with pytest.raises(ValueError, match="dtype"):
        ServerConfig.from_settings(dtype="float8").validate()
    assert ServerConfig().scheduler.resolved_max_num_batched_tokens(8192) == 8192
    assert ServerConfig().scheduler.resolved_max_num_batched_tokens(512) == 2048
