"""Beam search end to end in one process (Scheduler + ModelRunner on the default model, float32,
CPU) against transformers' `generate(num_beams=w, num_return_sequences=n, length_penalty,
early_stopping, do_sample=False)` on the same weights: the same n sequences, best first, with
scores within 1e-3; also with a KV cache small enough to force preemption."""

from __future__ import annotations

import pytest
import torch

from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.models import ModelNotFound, resolve_model
from shared.protocol import AddRequest, SamplingParams
from worker.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # loads the default model twice (ours and transformers'): about a minute on CPU

SCORE_ATOL = 1e-3
MAX_TOKENS = 6
TEXTS = ["The capital of France is", "Once upon a time", "The best way to learn", "Water boils at",
         "My favourite colour is", "In 1492,", "The quick brown fox", "Python is a", "The moon", "To be or not",
         "A good breakfast", "The weather today", "Cats and dogs", "The train left", "Music makes",
         "Science is", "I think that", "Hello, my name is", "The ocean", "Computers can",
         "The history of", "On Monday", "A small village", "The recipe calls for"]


@pytest.fixture(scope="module")
def files():
    try:
        return resolve_model("default")
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf(files):
    tok = transformers.AutoTokenizer.from_pretrained(files.directory, gguf_file=files.gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(files.directory, gguf_file=files.gguf_file,
                                                              dtype=torch.float32).eval()
    return tok, model


def _runner(num_kv_blocks: int) -> ModelRunner:
    r = ModelRunner(ServerConfig.from_settings(model="default", num_kv_blocks=num_kv_blocks, block_size=4,
                                               max_num_seqs=64, swap_space_gib=0.01))
    r.load()
    return r


@pytest.fixture(scope="module")
def runner(files):
    return _runner(400)


def _ours(runner: ModelRunner, prompts, params: SamplingParams, *, preemption_mode="recompute"):
    hello = runner.hello()
    config = ServerConfig.from_settings(max_num_seqs=64, preemption_mode=preemption_mode).scheduler
    sched = Scheduler(config, num_device_blocks=hello.num_device_blocks, block_size=hello.block_size,
                      max_model_len=hello.max_model_len, vocab_size=hello.vocab_size,
                      eos_token_ids=hello.eos_token_ids, num_host_blocks=hello.num_host_blocks)
    for i, prompt in enumerate(prompts):
        assert sched.add_request(AddRequest(f"r{i}", prompt, params, float(i)), b"fe") is None
    finished = {}
    while sched.has_work():
        plan = sched.schedule()
        for _, delta in sched.update(runner.execute(plan)):
            if delta.finish_reason is not None:
                finished[(delta.request_id, delta.index)] = delta
        sched.check_invariants()
    return sched, [[finished[(f"r{i}", k)] for k in range(params.n)] for i in range(len(prompts))]


def _reference(hf, prompt, width, n, length_penalty, early_stopping, eos):
    _, model = hf
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             num_beams=width, num_return_sequences=n, length_penalty=length_penalty,
                             early_stopping=early_stopping, do_sample=False, max_new_tokens=MAX_TOKENS,
                             eos_token_id=eos, pad_token_id=eos[0], output_scores=True, return_dict_in_generate=True)
    results = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        generated = seq[len(prompt):]
        ends = [i for i, t in enumerate(generated) if t in eos]
        results.append((generated[:ends[0] + 1] if ends else generated, score))
    return results


def _compare(hf, prompts, deltas, width, n, length_penalty, early_stopping, eos):
    for prompt, outputs in zip(prompts, deltas):
        expected = _reference(hf, prompt, width, n, length_penalty, early_stopping, eos)
        assert [d.token_ids for d in outputs] == [tokens for tokens, _ in expected]
        for delta, (_, score) in zip(outputs, expected):
            assert delta.beam_score == pytest.approx(score, abs=SCORE_ATOL)


def _prompts(hf, count):
    tok, _ = hf
    return [tok.encode(text) for text in TEXTS[:count]]


def _params(width, n, length_penalty, early_stopping):
    return SamplingParams(use_beam_search=True, best_of=width, n=n, temperature=0.0, max_tokens=MAX_TOKENS,
                          length_penalty=length_penalty, early_stopping=early_stopping)


@pytest.mark.parametrize("width,n,count,length_penalty,early_stopping", [
    (2, 2, 24, 1.0, False), (4, 2, 24, 0.6, True), (8, 3, 24, 1.0, "never"),
])
def test_beam_search_matches_transformers(hf, runner, width, n, count, length_penalty, early_stopping):
    prompts = _prompts(hf, count)
    eos = list(runner.eos_token_ids)
    sched, deltas = _ours(runner, prompts, _params(width, n, length_penalty, early_stopping))
    _compare(hf, prompts, deltas, width, n, length_penalty, early_stopping, eos)
    stats = sched.stats()
    assert stats["beam_kv_blocks_shared"] < stats["beam_kv_blocks_unshared"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beam_search_matches_transformers_under_preemption(hf, files, mode):
    runner = _runner(40)  # 12 groups of 4 beams cannot all fit: beams are preempted and parked
    prompts = _prompts(hf, 12)
    eos = list(runner.eos_token_ids)
    sched, deltas = _ours(runner, prompts, _params(4, 2, 1.0, False), preemption_mode=mode)
    assert sched.stats()["preemptions"] > 0
    _compare(hf, prompts, deltas, 4, 2, 1.0, False, eos)
