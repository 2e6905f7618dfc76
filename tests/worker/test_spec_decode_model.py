"""Speculative decoding end to end on the default model, in process: the real Scheduler plans
(n-gram proposals) and the real ModelRunner verifies them. Greedy and seeded outputs must equal
the non-speculative ones token for token (seeded rows draw the same noise per position), with
proposals accepted, with preemption forced, and with n = 2."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import AddRequest, SamplingParams
from shared.structured import StructuredOutputs
from worker.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")

PASSAGE = ("PagedAttention stores the key-value cache in fixed-size blocks, and a block table maps each "
           "sequence's logical blocks to physical ones, so memory is never reserved for tokens that do not exist.")
QUESTIONS = ["What is the capital of France?", "Count from one to twenty.", "Write a haiku about the sea.",
             "List the days of the week.", "Spell the word banana letter by letter.", "Say hello three times."]


@pytest.fixture(scope="module")
def spec_runner(spec_files):
    r = ModelRunner(ServerConfig.from_settings(model="default", num_kv_blocks=400, max_num_seqs=32))
    r.load()
    return r


@pytest.fixture(scope="module")
def spec_tokenizer(spec_files):
    return transformers.AutoTokenizer.from_pretrained(spec_files.directory, gguf_file=spec_files.gguf_file)


@pytest.fixture(scope="module")
def spec_prompts(spec_tokenizer):
    tok = spec_tokenizer

    def chat(text):
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=False))
    prompts = [chat(f"Repeat this text exactly: {PASSAGE}"), chat(f"Copy this twice: {PASSAGE}"),
               tok.encode(PASSAGE + " " + PASSAGE[:80]), tok.encode("1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,")]
    prompts += [chat(q) for q in QUESTIONS]
    prompts += [tok.encode(f"def f{i}(x):\n    return x + {i}\n\ndef f{i + 1}(x):\n    return x +") for i in range(6)]
    prompts += [chat(f"Repeat: {PASSAGE[i * 20:i * 20 + 90]}") for i in range(8)]
    assert len(prompts) == 24
    return prompts


def generate(runner: ModelRunner, prompts, params: SamplingParams, *, k: int, num_blocks: int = 400,
             tokenizer_json: str = ""):
    """Outputs by (request index, output index), and the scheduler's stats. Structured requests
    need `tokenizer_json`; their grammar masks go to the runner as the worker loop sends them."""
    hello = runner.hello()
    config = ServerConfig.from_settings(max_num_seqs=32, speculative_method="ngram" if k else "none",
                                        num_speculative_tokens=k, speculative_max_batch=0)
    compiled = threading.Event()
    sched = Scheduler(config.scheduler, num_device_blocks=min(num_blocks, hello.num_device_blocks),
                      block_size=hello.block_size, max_model_len=hello.max_model_len, vocab_size=hello.vocab_size,
                      eos_token_ids=hello.eos_token_ids, wake=compiled.set)
    if tokenizer_json:
        sched.structured.set_tokenizer(tokenizer_json)
    for i, prompt in enumerate(prompts):
        assert sched.add_request(AddRequest(f"r{i}", prompt, params, 0.0, 0), b"fe") is None
    while sched.awaiting_grammar():
        assert compiled.wait(30), "a grammar never finished compiling"
        compiled.clear()
        assert not sched.admit_compiled()
    outputs, logprobs = {}, {}
    while sched.has_work():
        plan = sched.schedule()
        masks = sched.step_masks(plan)
        result = runner.execute(plan, None if masks is None else lambda step_id: masks.bitmask)
        for _, delta in sched.update(result):
            key = (int(delta.request_id[1:]), delta.index)
            outputs.setdefault(key, []).extend(delta.token_ids)
            logprobs.setdefault(key, []).extend(delta.logprobs)
        sched.check_invariants()
    runner.batch.drop(list(runner.batch.seqs))  # a fresh scheduler reuses the sequence ids
    return outputs, logprobs, sched.stats()


def test_spec_greedy_matches_non_speculative_on_default_model(spec_runner, spec_prompts):
    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=1)
    want, want_lp, _ = generate(spec_runner, spec_prompts, params, k=0)
    got, got_lp, stats = generate(spec_runner, spec_prompts, params, k=4)
    assert got == want
    assert stats["spec_accepted_tokens"] > 0
    for key in want:  # one logprob entry per token, the same values as without speculation
        assert len(got_lp[key]) == len(got[key])
        assert torch.allclose(torch.tensor([lp.logprob for lp in got_lp[key]]),
                              torch.tensor([lp.logprob for lp in want_lp[key]]), atol=1e-3)


def test_spec_greedy_with_preemption_forced(spec_runner, spec_prompts):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    want, _, _ = generate(spec_runner, spec_prompts, params, k=0)
    got, _, stats = generate(spec_runner, spec_prompts, params, k=4, num_blocks=40)
    assert stats["preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    assert got == want


def test_spec_seeded_n2_reproduces_non_speculative(spec_runner, spec_prompts):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, n=2, max_tokens=24)
    want, _, _ = generate(spec_runner, spec_prompts[:8], params, k=0)
    got, _, stats = generate(spec_runner, spec_prompts[:8], params, k=4)
    assert got == want
    assert stats["spec_proposed_tokens"] > 0


def test_spec_with_penalties_matches_non_speculative(spec_runner, spec_prompts):
    # Each verification row counts the proposals before it as generated; a wrong count changes the
    # penalised logits and, on these copy-heavy prompts, the greedy choice.
    penalties = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=24, **penalties)
    want, _, _ = generate(spec_runner, spec_prompts, params, k=0)
    got, _, stats = generate(spec_runner, spec_prompts, params, k=4)
    assert got == want
    assert stats["spec_accepted_tokens"] > 0
    params = SamplingParams(temperature=0.3, seed=3, n=2, max_tokens=24, **penalties)
    want, _, _ = generate(spec_runner, spec_prompts[:8], params, k=0)
    got, _, stats = generate(spec_runner, spec_prompts[:8], params, k=4)
    assert got == want
    assert stats["spec_accepted_tokens"] > 0


def test_spec_with_grammar_matches_non_speculative(spec_runner, spec_tokenizer):
    # JSON that repeats its keys and copies the prompt's values: n-gram proposals cut to what the
    # grammar allows, a mask per verification position.
    records = [{"name": name, "city": city, "age": age} for name, city, age in
               [("Ada", "London", 36), ("Alan", "Wilmslow", 41), ("Grace", "Arlington", 85), ("Linus", "Helsinki", 54)]]
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "city": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "city", "age"], "additionalProperties": False}
    schema = {"type": "object", "properties": {"people": {"type": "array", "items": person, "maxItems": 4}},
              "required": ["people"], "additionalProperties": False}
    tok = spec_tokenizer
    prompts = [list(tok.apply_chat_template(
        [{"role": "user", "content": f"Repeat these records as JSON: {json.dumps(records[i:] + records[:i])}"}],
        add_generation_prompt=True, return_dict=False)) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=StructuredOutputs(json=schema))
    tokenizer_json = tok.backend_tokenizer.to_str()
    want, _, _ = generate(spec_runner, prompts, params, k=0, tokenizer_json=tokenizer_json)
    got, _, stats = generate(spec_runner, prompts, params, k=4, tokenizer_json=tokenizer_json)
    assert got == want
    assert stats["spec_accepted_tokens"] > 0
    for tokens in got.values():  # every output is schema-valid JSON so far
        assert tok.decode(tokens).startswith('{"people":[')
