"""Speculative decoding through the real server (flags, frontend, scheduler and worker processes):
greedy text equal to a server without speculation, including a stop string that falls inside an
accepted run of tokens, and proposals actually accepted (scheduler.stats)."""

from __future__ import annotations

import pytest
from server_process import ServerProcess

from shared.client import Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

PASSAGE = ("Blocks of sixteen tokens hold the key-value cache; a block table maps each sequence's logical "
           "blocks to physical ones, so no memory is reserved for tokens that do not exist yet.")


def test_speculative_server_greedy_and_stop_string_match_plain_server(server, tmp_path):
    prompts = [f"Repeat this text exactly: {PASSAGE}\n\n{PASSAGE[:60]}", "Count: 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,"]
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    with Client(server.address) as c:
        want = [c.generate(p, greedy).outputs[0] for p in prompts]
        stop = want[0].text[len(want[0].text) // 2:][:6]
        stopped = c.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop])).outputs[0]
    spec = ServerProcess(str(tmp_path / "run"), "--speculative-method", "ngram", "--num-speculative-tokens", "4",
                         "--stats-interval-s", "0.5")
    try:
        with Client(spec.address) as c:
            got = [c.generate(p, greedy).outputs[0] for p in prompts]
            got_stopped = c.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=40,
                                                                stop=[stop])).outputs[0]
        stats = spec.wait_for("scheduler.stats", timeout_s=30)
        accepted = max(e.get("spec_accepted_tokens", 0) for e in spec.named("scheduler.stats"))
    finally:
        assert spec.stop() == 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got_stopped.text == stopped.text and got_stopped.finish_reason == stopped.finish_reason == "stop"
    assert stats is not None and accepted > 0
