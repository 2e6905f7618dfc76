"""The memory manager in real processes with the default model: the same greedy
tokens as transformers under forced recompute, forced swap, prefix caching and
chunked prefill; n=4 seeded sampling reproducible and sharing blocks.

Ample memory is covered by test_serve.py (16 streams equal transformers on the
default server). Two servers here, several checks each:

* "tight": 12 blocks of 16 tokens, a 48-token step budget: recompute
  preemptions, chunked prefills, prefix caching (on by default);
* "swap": the same cache with --preemption-mode swap and host swap space.
"""

from __future__ import annotations

import asyncio

import pytest
from server_process import ServerProcess

from shared.client import AsyncClient, Client
from shared.protocol import SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
SYSTEM = ("You are a careful assistant for a railway company. Answer in one short sentence, name the station "
          "or the train when you know it, say so plainly when you do not, and never invent timetables, prices "
          "or platform numbers that the traveller did not give you.")
QUESTIONS = ["When does the first train leave?", "Is there a bike rack at the station?",
             "Can I bring my dog on board?"]
FRESH_QUESTIONS = ["Which platform for the night train?", "Do you sell coffee on the train?",
                   "How late is the last bus to the station?"]
SHORT_PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "The quick brown fox"]
TIGHT = ("--num-kv-blocks", "12", "--block-size", "16", "--max-num-batched-tokens", "48", "--max-num-seqs", "8")


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def _concurrently(address: str, requests: list[str | list[dict]], params: SamplingParams):
    """Prompts (str) and chats (message lists) at once."""
    async with AsyncClient(address) as client:
        return await asyncio.gather(*(client.generate(r, params) if isinstance(r, str) else client.chat(r, params)
                                      for r in requests))


_reference: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> transformers' greedy tokens, shared by the tests


def _assert_transformers_tokens(completions, greedy, max_tokens: int):
    for completion in completions:
        key = tuple(completion.prompt_token_ids)
        if key not in _reference:
            _reference[key] = greedy(completion.prompt_token_ids, max_tokens)
        assert completion.token_ids == _reference[key], completion.prompt_token_ids


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    srv = ServerProcess(str(tmp_path_factory.mktemp("tight")), *TIGHT)
    yield srv
    srv.stop()


def test_recompute_and_chunked_prefill_give_transformers_tokens(tight, hf_reference):
    _, greedy = hf_reference
    with Client(tight.address) as c:
        before = c.stats()
    requests = SHORT_PROMPTS + [chat(q) for q in QUESTIONS]
    completions = asyncio.run(_concurrently(tight.address, requests, GREEDY))
    with Client(tight.address) as c:
        after = c.stats()
    _assert_transformers_tokens(completions, greedy, MAX_TOKENS)
    assert after["preemptions_recompute"] > before["preemptions_recompute"]
    assert after["partial_prefills"] > before["partial_prefills"]  # ~75-token chats over a 48-token budget
    assert after["kv_blocks_used"] == 0 and after["kv_blocks_total"] == 12
    events = [e for e in tight.named("request.preempted") if e["mode"] == "recompute"]
    assert events and all(e["tokens_to_recompute"] > 0 and e["kv_blocks_total"] == 12 for e in events)
    assert sum(c.num_preemptions for c in completions) > 0


def test_shared_system_prompt_hits_the_prefix_cache(tight, hf_reference):
    _, greedy = hf_reference
    completions, hits = [], []
    with Client(tight.address) as c:
        for question in FRESH_QUESTIONS:  # asked nowhere else: only the system prompt can hit
            before = c.stats()["prefix_cache_hit_tokens"]
            completions.append(c.chat(chat(question), GREEDY))
            hits.append(c.stats()["prefix_cache_hit_tokens"] - before)
    _assert_transformers_tokens(completions, greedy, MAX_TOKENS)
    # The system prompt spans several full blocks; after the first chat every later one reuses them.
    assert all(hit >= 48 and hit % 16 == 0 for hit in hits[1:]), hits
    assert all(completions[0].prompt_token_ids[:hit] == c.prompt_token_ids[:hit]
               for c, hit in zip(completions[1:], hits[1:]))


def test_n4_seeded_is_reproducible_and_shares_the_prompt_blocks(tight):
    params = SamplingParams(n=4, max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    prompt = "Write the opening line of a mystery novel set in a lighthouse on a stormy night, in the voice of " \
             "a tired old keeper who has seen too much."
    with Client(tight.address) as c:
        before = c.stats()
        first = c.generate(prompt, params)
        allocated = c.stats()["kv_blocks_allocated"] - before["kv_blocks_allocated"]
        second = c.generate(prompt, params)
    outputs = [o.token_ids for o in first.outputs]
    assert [o.token_ids for o in second.outputs] == outputs
    assert len(outputs) == 4 and all(len(o) == 12 for o in outputs)
    assert len({tuple(o) for o in outputs}) > 1  # each output samples with its own key
    # Four separate requests would each hold the whole prompt plus 11 computed output tokens.
    separate = 4 * -(-(first.prompt_tokens + 11) // 16)
    assert allocated < separate, (allocated, separate)


def test_swap_preemption_gives_transformers_tokens(tmp_path, hf_reference):
    _, greedy = hf_reference
    srv = ServerProcess(str(tmp_path / "run"), *TIGHT, "--preemption-mode", "swap", "--swap-space", "0.05")
    try:
        requests = SHORT_PROMPTS + [chat(q) for q in QUESTIONS]
        completions = asyncio.run(_concurrently(srv.address, requests, GREEDY))
        with Client(srv.address) as c:
            stats = c.stats()
        preempted = srv.named("request.preempted")
    finally:
        assert srv.stop() == 0
    _assert_transformers_tokens(completions, greedy, MAX_TOKENS)
    assert stats["host_blocks_total"] > 0 and stats["host_blocks_used"] == 0
    assert stats["preemptions_swap"] > 0 and stats["blocks_swapped_out"] > 0 and stats["blocks_swapped_in"] > 0
    swaps = [e for e in preempted if e["mode"] == "swap"]
    assert swaps and all(e["tokens_to_recompute"] == 0 and e["host_blocks_total"] > 0 for e in swaps)
