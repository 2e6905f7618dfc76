"""Sampled speculative decoding keeps the target distribution: a random tiny Llama, many
unseeded requests of one prompt whose n-gram proposals are sometimes accepted and sometimes not,
with speculation on and off; a two-sample chi-square test on the three tokens (the last two one step's
accepted run with speculation on) finds no difference at temperature 0.7 and 1.0."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from tiny_llama import write_tiny_llama

from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import AddRequest, SamplingParams
from worker.model_runner import ModelRunner

pytest.importorskip("transformers")

NUM_REQUESTS = 1500


def prompt_with(x: int, y: int) -> list[int]:
    """After a first token x, the n-gram proposer (n = 1) matches x and proposes y, 13, 17, 5."""
    return [5, x, y, 13, 17, 5]


@pytest.fixture(scope="module")
def tiny_spec_model(tmp_path_factory):
    """(checkpoint path, prompt): a prompt whose first token is x often enough and whose
    proposal after x (y) is accepted sometimes but not always (searched with transformers)."""
    import transformers

    path = write_tiny_llama(tmp_path_factory.mktemp("tiny_spec"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # flatter logits (tiny_llama's reach tens): sampling has choices to make
        hf.lm_head.weight.mul_(0.4)
    hf.save_pretrained(path)
    tokens = torch.arange(20, 300)
    best = (0.0, None)
    with torch.no_grad():
        def probs(prompts: list[list[int]], of: torch.Tensor) -> torch.Tensor:
            return torch.softmax(hf(torch.tensor(prompts)).logits[:, -1], dim=-1)[torch.arange(len(prompts)), of]
        likely = probs([prompt_with(int(x), 9) for x in tokens], tokens)
        for x in tokens[likely.topk(3).indices].tolist():  # first tokens the model likes after such a prompt
            first = probs([prompt_with(x, int(y)) for y in tokens], torch.full_like(tokens, x))
            accept = probs([prompt_with(x, int(y)) + [x] for y in tokens], tokens)
            score = first * torch.minimum(accept, 1 - accept)
            i = int(score.argmax())
            if float(score[i]) > best[0]:
                best = (float(score[i]), prompt_with(x, int(tokens[i])))
    assert best[0] > 0.02, f"no prompt where proposals are both accepted and rejected ({best})"
    return path, best[1]


@pytest.fixture(scope="module")
def tiny_spec_runner(tiny_spec_model):
    r = ModelRunner(ServerConfig.from_settings(model=tiny_spec_model[0], num_kv_blocks=2048, block_size=8,
                                               max_num_seqs=256))
    r.load()
    return r


def two_tokens(runner: ModelRunner, prompt: list[int], temperature: float, k: int, seed: int) -> tuple[Counter, dict]:
    hello = runner.hello()
    config = ServerConfig.from_settings(max_num_seqs=256, speculative_method="ngram" if k else "none",
                                        num_speculative_tokens=k, prompt_lookup_min=1, prompt_lookup_max=1,
                                        speculative_max_batch=0)
    runner.sampler.generator.manual_seed(seed)
    sched = Scheduler(config.scheduler, num_device_blocks=hello.num_device_blocks, block_size=hello.block_size,
                      max_model_len=hello.max_model_len, vocab_size=hello.vocab_size, eos_token_ids=[])
    params = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True)
    for i in range(NUM_REQUESTS):
        assert sched.add_request(AddRequest(f"r{i}", prompt, params, 0.0, 0), b"fe") is None
    outputs: dict[str, list[int]] = {}
    while sched.has_work():
        for _, delta in sched.update(runner.execute(sched.schedule())):
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
    runner.batch.drop(list(runner.batch.seqs))
    return Counter(tuple(v) for v in outputs.values()), sched.stats()


def chi_square_two_sample(a: Counter, b: Counter, min_expected: float = 5.0) -> tuple[float, int]:
    """Statistic and degrees of freedom; categories rarer than `min_expected` are pooled."""
    n_a, n_b = sum(a.values()), sum(b.values())
    big, pooled = [], [0, 0]
    for key in set(a) | set(b):
        if (a[key] + b[key]) * min(n_a, n_b) / (n_a + n_b) >= min_expected:
            big.append((a[key], b[key]))
        else:
            pooled[0] += a[key]
            pooled[1] += b[key]
    if sum(pooled):
        big.append(tuple(pooled))
    stat = 0.0
    for x, y in big:
        total = x + y
        for observed, n in ((x, n_a), (y, n_b)):
            expected = total * n / (n_a + n_b)
            stat += (observed - expected) ** 2 / expected
    return stat, len(big) - 1


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(dof), Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_spec_sampled_distribution_matches_non_speculative(tiny_spec_model, tiny_spec_runner, temperature):
    prompt = tiny_spec_model[1]
    off, _ = two_tokens(tiny_spec_runner, prompt, temperature, k=0, seed=1)
    on, stats = two_tokens(tiny_spec_runner, prompt, temperature, k=4, seed=2)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]  # both outcomes happen
    stat, dof = chi_square_two_sample(off, on)
    assert dof >= 3
    assert stat < chi_square_critical(dof), (stat, dof, off.most_common(8), on.most_common(8))
