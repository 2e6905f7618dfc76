"""Draft-model speculation end to end, in process: the real Scheduler reserves draft slots and the
real ModelRunner drafts (worker/spec_draft.py) and verifies. Greedy and seeded outputs must equal
the non-speculative ones token for token, with the default model as its own draft (acceptance about
1.0: only if the draft's KV cache is right) and with a random-weight draft of the same vocabulary
(acceptance low), with preemption (recompute and swap) forced and with n = 2 (copy-on-write).
After every step, the self-draft's cache must hold the target's K/V at every computed position.
A draft with another tokenizer is refused at start-up."""

from __future__ import annotations

import json
import os

import msgspec
import pytest
import torch

from bench.random_model import write_random_model
from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import AddRequest, SamplingParams
from tests.worker.test_spec_decode_model import PASSAGE, QUESTIONS
from worker.draft_model import DraftMismatch
from worker.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")

K = 4
SETTINGS = dict(model="default", num_kv_blocks=300, max_num_seqs=16, swap_space_gib=0.05)


@pytest.fixture(scope="module")
def spec_prompts(spec_files):
    """8 prompts: 4 that copy a passage (high n-gram and draft acceptance), 4 questions."""
    tok = transformers.AutoTokenizer.from_pretrained(spec_files.directory, gguf_file=spec_files.gguf_file)

    def chat(text):
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=False))
    return [chat(f"Repeat this text exactly: {PASSAGE}"), tok.encode(PASSAGE + " " + PASSAGE[:80]),
            tok.encode("1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,"), chat(f"Repeat: {PASSAGE[20:110]}"),
            *[chat(q) for q in QUESTIONS[:4]]]


def runner_with(**settings) -> ModelRunner:
    r = ModelRunner(ServerConfig.from_settings(**SETTINGS, **settings))
    r.load()
    return r


@pytest.fixture(scope="module")
def plain_runner(spec_files):
    return runner_with()


@pytest.fixture(scope="module")
def self_draft_runner(spec_files):
    return runner_with(speculative_method="draft", num_speculative_tokens=K, draft_model="default")


@pytest.fixture(scope="module")
def random_draft_dir(spec_files, tmp_path_factory):
    """A 2-layer random-weight Llama with the default model's vocabulary and tokenizer."""
    directory = str(tmp_path_factory.mktemp("random_draft"))
    write_random_model("tiny", directory)
    tok = transformers.AutoTokenizer.from_pretrained(spec_files.directory, gguf_file=spec_files.gguf_file)
    for name in os.listdir(directory):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(directory, name))
    tok.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["vocab_size"] = len(tok.get_vocab())
    with open(path, "w") as f:
        json.dump(config, f)
    return directory


@pytest.fixture(scope="module")
def random_draft_runner(random_draft_dir):
    return runner_with(speculative_method="draft", num_speculative_tokens=K, draft_model=random_draft_dir,
                       draft_load_format="dummy")


def check_draft_cache(runner: ModelRunner) -> None:
    """The self-draft's K/V equal the target's at every computed position of every live sequence."""
    bs, target, draft = runner.config.worker.block_size, runner.kv_cache, runner.draft.kv_cache
    for seq in runner.batch.seqs.values():
        positions = torch.arange(seq.num_computed_tokens)
        if not len(positions):
            continue
        blocks = torch.tensor(seq.block_ids, dtype=torch.int64)[positions // bs]
        for layer in (0, len(target.key_caches) - 1):
            for t, d in ((target.key_caches[layer], draft.key_caches[layer]),
                         (target.value_caches[layer], draft.value_caches[layer])):
                want, got = t[blocks, positions % bs], d[blocks, positions % bs]
                assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), \
                    f"seq {seq.seq_id}: draft KV differs at layer {layer}: {(got - want).abs().max()}"


def generate(runner: ModelRunner, prompts, params: SamplingParams, *, k: int, num_blocks: int = 300,
             preemption_mode: str = "recompute", check_cache: bool = False, waves: int = 1):
    """Outputs by (request index, output index), the scheduler's stats and each output's speculation
    figures on its finishing delta. `waves` > 1: the prompts again once the previous wave finished
    (request indices go on), so the prefix cache serves them blocks other requests computed."""
    hello = runner.hello()
    config = ServerConfig.from_settings(max_num_seqs=16, speculative_method="draft" if k else "none",
                                        num_speculative_tokens=k, speculative_max_batch=0,
                                        preemption_mode=preemption_mode)
    sched = Scheduler(config.scheduler, num_device_blocks=min(num_blocks, hello.num_device_blocks),
                      block_size=hello.block_size, max_model_len=hello.max_model_len, vocab_size=hello.vocab_size,
                      eos_token_ids=hello.eos_token_ids, num_host_blocks=hello.num_host_blocks)
    outputs, finished = {}, {}
    for wave in range(waves):
        for i, prompt in enumerate(prompts):
            request = AddRequest(f"r{wave * len(prompts) + i}", prompt, params, 0.0, 0)
            assert sched.add_request(request, b"fe") is None
        run_all(runner, sched, outputs, finished, check_cache)
    runner.batch.drop(list(runner.batch.seqs))  # a fresh scheduler reuses the sequence ids
    return outputs, sched.stats(), finished


def run_all(runner: ModelRunner, sched: Scheduler, outputs: dict, finished: dict, check_cache: bool) -> None:
    while sched.has_work():
        plan = sched.schedule()
        for _, delta in sched.update(runner.execute(plan)):
            key = (int(delta.request_id[1:]), delta.index)
            outputs.setdefault(key, []).extend(delta.token_ids)
            if delta.finish_reason is not None:
                finished[key] = (delta.spec_proposed, delta.spec_accepted)
        sched.check_invariants()
        if check_cache:
            check_draft_cache(runner)


_reference: dict = {}


def reference(runner: ModelRunner, prompts, params: SamplingParams):
    key = (len(prompts), msgspec.json.encode(params))
    if key not in _reference:
        _reference[key] = generate(runner, prompts, params, k=0)[0]
    return _reference[key]


def acceptance(stats) -> float:
    return stats["spec_accepted_tokens"] / stats["spec_proposed_tokens"]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def test_self_draft_greedy_identical_accepts_nearly_all(plain_runner, self_draft_runner, spec_prompts):
    want = reference(plain_runner, spec_prompts[:8], GREEDY)
    got, stats, finished = generate(self_draft_runner, spec_prompts[:8], GREEDY, k=K, check_cache=True)
    assert got == want
    assert stats["spec_proposed_tokens"] > 0 and acceptance(stats) > 0.9, stats
    # request.finished's figures come on the finishing delta: they add up to the scheduler's totals
    assert sum(p for p, _ in finished.values()) == stats["spec_proposed_tokens"]
    assert sum(a for _, a in finished.values()) == stats["spec_accepted_tokens"]


def test_random_draft_greedy_identical(plain_runner, random_draft_runner, spec_prompts):
    want = reference(plain_runner, spec_prompts[:8], GREEDY)
    got, stats, _ = generate(random_draft_runner, spec_prompts[:8], GREEDY, k=K)
    assert got == want
    assert stats["spec_proposed_tokens"] > 0 and acceptance(stats) < 0.5, stats


def test_self_draft_after_prefix_cache_hits(plain_runner, self_draft_runner, spec_prompts):
    """Blocks found in the prefix cache were computed for an earlier request: the draft's cache holds
    their K/V as the target's does."""
    want = reference(plain_runner, spec_prompts[:4], GREEDY)
    got, stats, _ = generate(self_draft_runner, spec_prompts[:4], GREEDY, k=K, check_cache=True, waves=2)
    assert stats["prefix_cache_hit_tokens"] > 0
    assert [got[(i, 0)] for i in range(4, 8)] == [want[(i, 0)] for i in range(4)]
    assert acceptance(stats) > 0.9, stats


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_self_draft_with_preemption_forced(plain_runner, self_draft_runner, spec_prompts, mode):
    want = reference(plain_runner, spec_prompts[:8], GREEDY)
    got, stats, _ = generate(self_draft_runner, spec_prompts[:8], GREEDY, k=K, num_blocks=30,
                             preemption_mode=mode, check_cache=True)
    assert stats["preemptions"] > 0 and stats[f"preemptions_{mode}"] > 0, stats
    assert got == want
    assert acceptance(stats) > 0.9, stats  # the draft's blocks were recomputed / swapped too


def test_random_draft_with_preemption_forced(plain_runner, random_draft_runner, spec_prompts):
    want = reference(plain_runner, spec_prompts[:8], GREEDY)
    got, stats, _ = generate(random_draft_runner, spec_prompts[:8], GREEDY, k=K, num_blocks=30)
    assert stats["preemptions"] > 0 and stats["spec_proposed_tokens"] > 0
    assert got == want


def test_n2_greedy_and_seeded_identical(plain_runner, self_draft_runner, random_draft_runner, spec_prompts):
    for params in (SamplingParams(temperature=0.0, n=2, max_tokens=16),
                   SamplingParams(temperature=0.8, top_p=0.95, seed=7, n=2, max_tokens=16)):
        want = reference(plain_runner, spec_prompts[:4], params)
        got, stats, _ = generate(self_draft_runner, spec_prompts[:4], params, k=K, check_cache=True)
        assert got == want and stats["spec_proposed_tokens"] > 0
        if params.temperature == 0.0:
            assert acceptance(stats) > 0.9, stats  # copy-on-write copied the draft's blocks too
        got, stats, _ = generate(random_draft_runner, spec_prompts[:4], params, k=K)
        assert got == want and stats["spec_proposed_tokens"] > 0


def test_draft_with_another_tokenizer_is_refused(spec_files, tmp_path):
    directory = write_random_model("tiny", str(tmp_path / "other"))
    # Same vocabulary size as the target, other tokens: the tokenizer comparison must catch it.
    tok = transformers.AutoTokenizer.from_pretrained(spec_files.directory, gguf_file=spec_files.gguf_file)
    size = len(tok.get_vocab())
    from bench.random_model import _write_tokenizer
    _write_tokenizer(directory, size)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config, "vocab_size": size}, f)
    r = ModelRunner(ServerConfig.from_settings(model="default", num_kv_blocks=16, speculative_method="draft",
                                               num_speculative_tokens=2, draft_model=directory,
                                               draft_load_format="dummy"))
    with pytest.raises(DraftMismatch, match="tokenizer differs"):
        r.load()
    small = write_random_model("tiny", str(tmp_path / "small"))  # vocab_size 1024
    r = ModelRunner(ServerConfig.from_settings(model="default", num_kv_blocks=16, speculative_method="draft",
                                               num_speculative_tokens=2, draft_model=small, draft_load_format="dummy"))
    with pytest.raises(DraftMismatch, match="vocab_size 1024"):
        r.load()


def test_draft_settings_are_checked():
    with pytest.raises(ValueError, match="needs --draft-model"):
        ServerConfig.from_settings(speculative_method="draft", num_speculative_tokens=2).validate()
    with pytest.raises(ValueError, match="tensor_parallel_size 2"):
        ServerConfig.from_settings(speculative_method="draft", num_speculative_tokens=2, draft_model="default",
                                   tensor_parallel_size=2).validate()
