"""`pagedserve bench serve --variant ...`: flags, one server per variant, the table, JSON and plot.

The servers are stand-ins (no process, made-up timings): this checks what the bench does with
variants, never how fast anything is."""

from __future__ import annotations

import argparse
import contextlib
import json

import pytest

from bench import cli, serve_variants
from bench.metrics import RequestRecord, summarize


class FakeTarget:
    name = "pagedserve"

    def __init__(self, flags: list[str]):
        self.flags = flags

    def describe(self) -> dict:
        return {"backend": "zmq"}

    def run(self, requests, rate, slos_ms=None, **kwargs) -> dict:
        slow = "fcfs" in self.flags  # the "before" server: one long stall per request
        records = [RequestRecord(len(r.prompt_ids), 0.0, [0.1 + 0.05 * k + (0.5 if slow and k >= 2 else 0.0)
                                                          for k in range(r.output_len)]) for r in requests]
        return {**summarize(records, 2.0, slos_ms), "steps": 10, "steps_over_target": 1, "_records": records}


@pytest.fixture
def started(monkeypatch):
    flags_seen = []

    @contextlib.contextmanager
    def fake_open_target(args, log_path, server_flags):
        flags_seen.append(server_flags)
        yield FakeTarget(server_flags)

    monkeypatch.setattr(serve_variants, "open_target", fake_open_target)
    return flags_seen


def test_variants_run_the_same_sweep_on_a_server_each(tmp_path, started, capsys):
    code = cli.main(["serve", "--dataset", "synthetic", "--num-prompts", "3", "--max-output-len", "6",
                     "--request-rate", "2", "inf", "--goodput", "tpot:100", "--out", str(tmp_path), "--tag", "cmp",
                     "--variant", "before=--batching-policy fcfs", "--variant", "after=--target-tpot-ms 50"])
    assert code == 0
    assert [flags[-2:] for flags in started] == [["--batching-policy", "fcfs"], ["--target-tpot-ms", "50"]]
    assert all("--enable-prefix-caching" in flags for flags in started)  # the bench's own server flags too
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert list(result["variants"]) == ["before", "after"]
    assert result["variants"]["before"]["server_args"] == ["--batching-policy", "fcfs"]
    for variant in result["variants"].values():
        assert list(variant["rates"]) == ["2", "inf"]
        assert all(run["completed"] == 3 and "goodput" in run for run in variant["rates"].values())
    before, after = (result["variants"][v]["rates"]["2"] for v in ("before", "after"))
    assert before["tpot_ms"]["p99"] > after["tpot_ms"]["p99"]
    assert len(after["per_request_ms"]) == 3 and all(ttft == 100.0 for ttft, _ in after["per_request_ms"])
    assert serve_variants.goodput_at(after, 1000, 60) == after["goodput"]["requests_per_s"] == 1.5
    assert serve_variants.goodput_at(before, 1000, 60) == 0.0  # the stall puts every TPOT at 150 ms
    out = capsys.readouterr().out
    assert "TPOT p99" in out and "before" in out and "after" in out and "1/10" in out and "tpot <= 100 ms" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cmp-tpot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text", ["noflags", "=--x", "bad name=--x"])
def test_a_bad_variant_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        serve_variants.variant_item(text)


def test_variant_flags_split_as_a_shell_would():
    assert serve_variants.variant_item("a=--server-arg 'x y' --z") == ("a", ["--server-arg", "x y", "--z"])
    assert serve_variants.variant_item("defaults=") == ("defaults", [])


@pytest.mark.parametrize("extra", [["--server", "tcp://127.0.0.1:1"],
                                   ["--variant", "a=--x"]])
def test_variants_need_servers_started_here_with_distinct_names(extra, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--dataset", "synthetic", "--variant", "a=--y", *extra])
    assert exc.value.code == 2 and "--variant" in capsys.readouterr().err
