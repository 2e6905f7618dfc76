"""Structured output through the real server on the default model (float32): 32 JSON Schemas
sampled at temperature 1.0 with several seeds all parse and validate; regex and choice outputs
match; n=4 and forced preemption (recompute here, swap on a second server) keep every output
valid; neighbours change no one's tokens (seeded, constrained or not); greedy constrained output equals
transformers' logits under the same llguidance mask, token for token."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import llguidance
import pytest
import torch
from server_process import ServerProcess
from structured_schemas import SCHEMAS

from scheduler.grammar_compiler import llguidance_grammar
from shared.client import AsyncClient, Client, RequestError
from shared.protocol import SamplingParams
from shared.structured import StructuredOutputs

pytestmark = pytest.mark.slow

# 40 blocks of 16 tokens for up to 32 sequences of ~100 tokens: requests are preempted (recompute).
TIGHT = ("--num-kv-blocks", "40", "--block-size", "16", "--max-num-seqs", "32")
ASK = "Reply with a JSON value for this task. Task: {}"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(str(tmp_path_factory.mktemp("run")), *TIGHT)
    yield server
    server.stop()


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def _many(address: str, jobs: list[tuple[list[dict], SamplingParams]]):
    async with AsyncClient(address) as client:
        return await asyncio.gather(*(client.chat(m, p, timeout=600) for m, p in jobs))


def test_every_schema_sample_validates_and_regex_and_choice_match(srv):
    jobs = [(_chat(ASK.format(json.dumps(schema)[:80])),
             SamplingParams(max_tokens=200, temperature=1.0, seed=seed,
                            structured_outputs=StructuredOutputs(json=schema)))
            for schema in SCHEMAS for seed in (1, 2)]
    regex = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    jobs.append((_chat("Name a street and number."), SamplingParams(
        max_tokens=40, n=4, seed=3, structured_outputs=StructuredOutputs(regex=regex))))
    choices = ["positive", "negative", "neutral"]
    jobs.append((_chat("Sentiment of: I love it."), SamplingParams(
        max_tokens=10, n=4, seed=4, structured_outputs=StructuredOutputs(choice=choices))))
    jobs.append((_chat("Any JSON object."), SamplingParams(
        max_tokens=200, n=4, seed=5, structured_outputs=StructuredOutputs(json=SCHEMAS[12]))))
    with Client(srv.address) as c:
        before = c.stats()
    results = asyncio.run(_many(srv.address, jobs))
    with Client(srv.address) as c:
        after = c.stats()
    for (_, params), result in zip(jobs, results):
        so = params.structured_outputs
        for out in result.outputs:
            assert out.finish_reason == "stop", (so, out.text)
            if so.regex:
                assert re.fullmatch(so.regex, out.text), out.text
            elif so.choice:
                assert out.text in so.choice
            else:
                jsonschema.validate(json.loads(out.text), so.json)
    assert after["preemptions_recompute"] > before["preemptions_recompute"]  # the cache is tight on purpose
    assert after["structured_masks"] > before["structured_masks"] and after["structured_awaiting_grammar"] == 0


def test_neighbours_do_not_change_tokens_constrained_or_not(srv):
    free = [(_chat(f"Write a line about the number {i}."), SamplingParams(max_tokens=24, seed=i, ignore_eos=True))
            for i in range(6)]
    constrained = [(_chat("A person as JSON."), SamplingParams(max_tokens=120, seed=i,
                                                               structured_outputs=StructuredOutputs(json=SCHEMAS[0])))
                   for i in range(6)]
    alone = asyncio.run(_many(srv.address, free))
    mixed = asyncio.run(_many(srv.address, [job for pair in zip(free, constrained) for job in pair]))
    assert [r.token_ids for r in alone] == [r.token_ids for r in mixed[0::2]]
    # A seeded constrained request gives the same tokens alone as in that batch.
    shaped_alone = [asyncio.run(_many(srv.address, [job]))[0] for job in constrained[:2]]
    assert [r.token_ids for r in shaped_alone] == [r.token_ids for r in mixed[1:4:2]]


def test_a_bad_grammar_fails_alone_with_its_reason(srv):
    async def scenario():
        async with AsyncClient(srv.address) as client:
            good = asyncio.create_task(client.generate("Count: one, two,",
                                                       SamplingParams(max_tokens=8, ignore_eos=True)))
            with pytest.raises(RequestError) as bad:
                await client.generate("x", SamplingParams(structured_outputs=StructuredOutputs(
                    json={"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}})))
            return await good, bad.value

    good, bad = asyncio.run(scenario())
    assert bad.code == "invalid_request" and "structured_outputs: json" in str(bad)
    assert good.finish_reason == "length" and len(good.token_ids) == 8


def test_greedy_constrained_equals_transformers_under_the_same_mask(srv, hf_model):
    tok, model = hf_model
    vocab = model.config.vocab_size
    lltok = llguidance.LLTokenizer(tok.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=tok.eos_token_id)
    specs = [StructuredOutputs(json=SCHEMAS[0]), StructuredOutputs(json=SCHEMAS[16]),
             StructuredOutputs(regex=r"[0-9]{3}-[0-9]{4}"), StructuredOutputs(choice=["Paris", "Lyon", "Nice"])]
    prompts = ["What is the capital of France?", "Give me a JSON record of a famous scientist."]
    with Client(srv.address) as c:
        for spec in specs:
            for prompt in prompts:
                out = c.chat(_chat(prompt), SamplingParams(max_tokens=80, temperature=0.0, structured_outputs=spec))
                assert out.finish_reason == "stop"
                assert out.token_ids == _masked_greedy(model, lltok, spec, out.prompt_token_ids, 80), (spec, prompt)


def _masked_greedy(model, lltok, spec: StructuredOutputs, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers' float32 logits, llguidance's mask for the same grammar, argmax; stop where
    the grammar can go no further (or at EOS), as the server does."""
    matcher = llguidance.LLMatcher(lltok, llguidance_grammar(spec), log_level=0)
    words = (lltok.vocab_size + 31) // 32
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        while len(out) < max_tokens:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            mask = torch.zeros(words, dtype=torch.int32)
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), 4 * words)
            allowed = ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:logits.numel()]
            token = int(logits.masked_fill(allowed == 0, float("-inf")).argmax())
            ids.append(token)
            out.append(token)
            assert matcher.consume_token(token)
            if matcher.is_stopped():
                break
    return out


def test_n4_under_swap_preemption_every_output_validates(tmp_path):
    # 20 blocks of 16 tokens for 24 sequences: swapped out and back in.
    server = ServerProcess(str(tmp_path / "run"), "--num-kv-blocks", "20", "--block-size", "16", "--max-num-seqs", "32",
                           "--preemption-mode", "swap", "--swap-space", "0.05")
    try:
        jobs = [(_chat(f"A JSON record number {i}."), SamplingParams(
            max_tokens=200, n=4, seed=i, structured_outputs=StructuredOutputs(json=SCHEMAS[i])))
                for i in (0, 9, 12, 26, 3, 4)]
        results = asyncio.run(_many(server.address, jobs))
        with Client(server.address) as c:
            stats = c.stats()
    finally:
        server.stop()
    for (_, params), result in zip(jobs, results):
        for out in result.outputs:
            assert out.finish_reason == "stop"
            jsonschema.validate(json.loads(out.text), params.structured_outputs.json)
    assert stats["preemptions_swap"] > 0
