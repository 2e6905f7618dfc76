"""Speculative decoding through the real server (flags, frontend, scheduler and worker processes):
greedy text equal to a server without speculation, including a stop string that falls inside an
accepted run of tokens, and proposals actually accepted (scheduler.stats); request.finished carries
each request's figures; the draft-model method through serve. Under tensor parallelism 2 (a small
random-weight Llama, since the default model's 3 KV heads do not split 2 ways): n-gram greedy
tokens equal transformers' (which a non-speculative TP=2 server gives too:
tests/integration/test_tensor_parallel.py)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from server_process import ServerProcess
from small_llama import save_small_llama

from shared.client import AsyncClient, Client
from shared.protocol import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "worker"))
from hf_reference import hf_greedy  # noqa: E402
from test_operations import check_events_against_docs  # noqa: E402

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
    finished = [e for e in spec.named("request.finished") if "spec_proposed" in e]
    assert finished and all(0 <= e["spec_accepted"] <= e["spec_proposed"] for e in finished)
    assert any(e["spec_accepted"] > 0 for e in finished)
    assert got_stopped.text == stopped.text and got_stopped.finish_reason == stopped.finish_reason == "stop"
    assert stats is not None and accepted > 0


def test_draft_model_server_greedy_matches_plain_server(server, tmp_path):
    """--speculative-method draft through serve: the flags reach the worker, which loads the draft
    (the default model as its own draft: about every proposal accepted), and greedy tokens are the
    plain server's."""
    prompts = [f"Repeat this text exactly: {PASSAGE}", "Write a haiku about the sea."]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    with Client(server.address) as c:
        want = [c.generate(p, greedy).outputs[0].token_ids for p in prompts]
    spec = ServerProcess(str(tmp_path / "run"), "--speculative-method", "draft", "--draft-model", "default",
                         "--num-speculative-tokens", "3")
    try:
        with Client(spec.address) as c:
            got = [c.generate(p, greedy).outputs[0].token_ids for p in prompts]
    finally:
        assert spec.stop() == 0
    assert got == want
    assert spec.named("worker.draft_loaded")
    finished = [e for e in spec.named("request.finished") if "spec_proposed" in e]
    assert len(finished) == 2 and sum(e["spec_accepted"] for e in finished) > 0.9 * sum(
        e["spec_proposed"] for e in finished)
    check_events_against_docs(spec.events)


async def _generate_all(address: str, requests: list[dict]) -> list:
    async with AsyncClient(address) as client:
        return await asyncio.gather(*(client.generate(**r) for r in requests))


def test_ngram_greedy_under_tensor_parallel_2_matches_transformers(tmp_path):
    path = tmp_path / "small_llama"
    hf = save_small_llama(path, attention_output_scale=0.05)  # weak attention: greedy runs repeat
    srv = ServerProcess(str(tmp_path / "run"), "--model", str(path), "--tensor-parallel-size", "2",
                        "--block-size", "8", "--speculative-method", "ngram", "--num-speculative-tokens", "4",
                        "--speculative-max-batch", "0", "--stats-interval-s", "0.5")
    try:
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        # seed, the model's own continuation of it, seed again: n-grams match, and some proposals are right.
        seeds = [[(7 * i + 3 * j) % 49152 + 10 for j in range(6 + 2 * i)] for i in range(4)]
        prompts = [seed + hf_greedy(hf, seed, 24) + seed for seed in seeds]
        results = asyncio.run(_generate_all(srv.address, [dict(prompt_token_ids=p, params=params)
                                                           for p in prompts]))
    finally:
        assert srv.stop() == 0
    stats = srv.named("scheduler.stats")[-1]  # the last: at stop, the final totals
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 16) for p in prompts]
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"], stats
    assert sorted(e["rank"] for e in srv.named("worker.loaded")) == [0, 1]
    check_events_against_docs(srv.events)
