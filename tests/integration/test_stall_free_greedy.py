"""Decode-first steps in real processes: the greedy tokens are transformers' under forced
recompute preemption, tiny prefill chunks (a 16-token cap) and a step budget from
--target-tpot-ms, whatever sizes the learned step-time model gives the chunks.

One server; the prompts, the tight cache and the transformers oracle are test_memory.py's."""

from __future__ import annotations

import asyncio

import pytest
from server_process import ServerProcess
from test_memory import GREEDY, MAX_TOKENS, QUESTIONS, SHORT_PROMPTS, TIGHT, _assert_transformers_tokens, \
    _concurrently, chat

from shared.client import Client

pytestmark = pytest.mark.slow


def test_decode_first_with_a_target_gives_transformers_tokens_under_preemption(tmp_path, hf_reference):
    _, greedy = hf_reference
    srv = ServerProcess(str(tmp_path / "run"), *TIGHT, "--batching-policy", "decode_first",
                        "--long-prefill-token-threshold", "16",
                        "--target-tpot-ms", "100")
    try:
        requests = SHORT_PROMPTS + [chat(q) for q in QUESTIONS]
        completions = asyncio.run(_concurrently(srv.address, requests, GREEDY))
        with Client(srv.address) as c:
            stats = c.stats()
    finally:
        assert srv.stop() == 0
    _assert_transformers_tokens(completions, greedy, MAX_TOKENS)
    assert stats["preemptions_recompute"] > 0 and stats["partial_prefills"] > 0
    assert stats["target_tpot_ms"] == 100 and stats["step_decode_tokens"] > 0 and stats["step_prefill_tokens"] > 0
    assert stats["step_model_ms_per_token"] > 0 and stats["kv_blocks_used"] == 0
