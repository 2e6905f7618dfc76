"""The routing and data-parallel settings: flags, TOML lists, validation."""

from __future__ import annotations

import pytest

from shared.config import ServerConfig
from shared.config_file import ConfigError, load_config


def test_engines_come_comma_separated_from_a_flag_and_as_a_list_from_toml(tmp_path):
    config = load_config(None, {"engines": "ipc:///run/a.sock, tcp://10.0.0.2:5557", "data_parallel_size": "2"})
    assert config.routing.engines == ["ipc:///run/a.sock", "tcp://10.0.0.2:5557"]
    assert config.parallel.data_parallel_size == 2
    path = tmp_path / "c.toml"
    path.write_text('[routing]\nengines = ["tcp://h1:5557", "tcp://h2:5557"]\nrouting_policy = "least_loaded"\n')
    config = load_config(str(path))
    assert config.routing.engines == ["tcp://h1:5557", "tcp://h2:5557"]
    assert config.routing.routing_policy == "least_loaded"


def test_without_engines_the_frontend_uses_the_one_scheduler():
    config = ServerConfig.from_settings(scheduler_frontend_addr="tcp://127.0.0.1:9")
    assert config.routing.resolved_engines(config.endpoints.scheduler_addr_for_frontends()) == ["tcp://127.0.0.1:9"]


@pytest.mark.parametrize("settings, message", [
    ({"engines": "http://x"}, "ipc://PATH or tcp://"),
    ({"engines": "tcp://a:1,tcp://a:1"}, "listed twice"),
    ({"data_parallel_size": "0"}, "data_parallel_size"),
    ({"routing_load_margin": "-1"}, "routing_load_margin"),
    ({"routing_policy": "random"}, "routing_policy"),
])
def test_bad_routing_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)
