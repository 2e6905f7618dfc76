"""Penalties, filters, min_tokens and logprobs against transformers' logits processors and
torch's log-softmax, on the same logits; penalty counts kept incrementally by the worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampling_helpers import CPU, make_batch

from shared.protocol import NewSeq, SamplingParams, ScheduledSeq
from worker.input_batch import InputBatch
from worker.logprobs import sampled_logprobs
from worker.penalties import apply_min_tokens, apply_penalties
from worker.sampler import Sampler, filter_logits

lp = pytest.importorskip("transformers.generation.logits_process")

VOCAB = 64


def _logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _assert_same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    assert finite.any(dim=-1).all()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,values,warper", [
    ("top_k", [1, 3, 10, 63], lp.TopKLogitsWarper),
    ("top_p", [0.05, 0.3, 0.6, 0.9, 0.99], lp.TopPLogitsWarper),
    ("min_p", [0.01, 0.1, 0.5, 0.9], lp.MinPLogitsWarper),
])
def test_each_filter_equals_transformers(name, values, warper):
    logits = _logits(len(values), seed=len(values))
    _, meta = make_batch([SamplingParams(**{name: v}) for v in values], VOCAB)
    ours = filter_logits(logits.clone(), meta)
    theirs = torch.cat([warper(v)(None, logits[i:i + 1].clone()) for i, v in enumerate(values)])
    _assert_same_filter(ours, theirs)


def test_temperature_then_filters_equal_transformers_warper_chain():
    """A row with one filter: temperature then that filter, as transformers' chain does it."""
    logits = _logits(3, seed=7)
    params = [SamplingParams(temperature=0.5, top_k=5), SamplingParams(temperature=1.7, top_p=0.7),
              SamplingParams(temperature=0.8, min_p=0.2)]
    warpers = [lp.TopKLogitsWarper(5), lp.TopPLogitsWarper(0.7), lp.MinPLogitsWarper(0.2)]
    _, meta = make_batch(params, VOCAB)
    ours = filter_logits(logits / meta.temperature[:, None], meta)
    theirs = torch.cat([w(None, lp.TemperatureLogitsWarper(p.temperature)(None, logits[i:i + 1].clone()))
                        for i, (p, w) in enumerate(zip(params, warpers))])
    _assert_same_filter(ours, theirs)


def test_repetition_penalty_equals_transformers_over_prompt_and_output():
    logits = _logits(3, seed=11)
    prompts, outputs = [[1, 2, 3, 2], [5], [7, 8]], [[9, 9, 1], [], [8, 40, 41]]
    penalties = [1.3, 2.0, 0.7]
    state, meta = make_batch([SamplingParams(repetition_penalty=p) for p in penalties], VOCAB,
                             prompts=prompts, outputs=outputs)
    ours = apply_penalties(logits.clone(), meta, state)
    for i, p in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        theirs = lp.RepetitionPenaltyLogitsProcessor(p)(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], theirs, rtol=1e-6, atol=1e-6)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = _logits(2, seed=12)
    prompt, output = [3, 4, 5], [4, 4, 6, 4, 7]
    params = [SamplingParams(frequency_penalty=0.5), SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0)]
    state, meta = make_batch(params, VOCAB, prompts=[prompt] * 2, outputs=[output] * 2)
    ours = apply_penalties(logits.clone(), meta, state)
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()
    for i, p in enumerate(params):
        expected = logits[i] - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        torch.testing.assert_close(ours[i], expected)
    assert ours[0, 3] == logits[0, 3] and ours[0, 5] == logits[0, 5]  # prompt-only tokens untouched


def test_penalty_counts_are_kept_incrementally_in_the_persistent_batch():
    """Counts after several sampled steps (and a sequence re-added after a preemption) equal a
    bincount of the generated tokens; the sampled tokens are forced by min_p=1 on fixed logits."""
    batch = InputBatch(block_size=4, max_model_len=64, device=CPU, initial_rows=1, vocab_size=VOCAB)
    params = SamplingParams(temperature=1.0, presence_penalty=0.5, repetition_penalty=1.2)
    batch.add(NewSeq(seq_id=1, token_ids=[1, 2, 3], prompt_len=3, block_ids=[0, 1, 4], params=params))
    batch.add(NewSeq(seq_id=2, token_ids=[4, 5], prompt_len=2, block_ids=[2, 3], params=SamplingParams()))
    sampler = Sampler(CPU)
    schedule = [ScheduledSeq(1, 3, 0), ScheduledSeq(2, 2, 0)]
    for step, token in enumerate([10, 11, 10, 12]):
        inputs = batch.prepare(schedule)
        logits = torch.full((2, VOCAB), -5.0)
        logits[:, token] = 5.0  # far above any penalty: this token is sampled
        out = sampler.sample(logits, inputs.sampling, batch.sampling)
        batch.record(schedule, inputs, out.token_ids.tolist(), out.token_ids)
        schedule = [ScheduledSeq(1, 1, 3 + step), ScheduledSeq(2, 1, 2 + step)]
    seq = batch.seqs[1]
    assert seq.token_ids == [1, 2, 3, 10, 11, 10, 12]
    expected = torch.bincount(torch.tensor(seq.token_ids[3:]), minlength=VOCAB).int()
    assert torch.equal(batch.sampling.output_counts[seq.row], expected)
    assert batch.sampling.prompt_mask[seq.row].nonzero().flatten().tolist() == [1, 2, 3]
    # Rows grew (initial_rows=1), and a re-added (preempted) sequence rebuilds its row's counts.
    batch.add(NewSeq(seq_id=1, token_ids=seq.token_ids, prompt_len=3, block_ids=[0, 1, 4], params=params))
    assert torch.equal(batch.sampling.output_counts[batch.seqs[1].row], expected)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = _logits(4, seed=13)
    eos = (2,)
    params = [SamplingParams(min_tokens=3, stop_token_ids=[5, 6]), SamplingParams(min_tokens=3),
              SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=[7]), SamplingParams(stop_token_ids=[5])]
    _, meta = make_batch(params, VOCAB, generated=[2, 3, 0, 0], eos=eos)
    ours = apply_min_tokens(logits.clone(), meta)
    masked = [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in ours]
    # Row 0 is under min_tokens; row 1 has reached it; row 2 ignores EOS; row 3 has no min_tokens.
    assert masked == [{2, 5, 6}, set(), {7}, set()]
    reference = lp.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=1, min_new_tokens=3, eos_token_id=[2, 5, 6])
    theirs = reference(torch.zeros(1, 1 + 2, dtype=torch.long), logits[:1].clone())
    _assert_same_filter(ours[:1], theirs)


def test_greedy_with_min_tokens_never_picks_a_masked_stop():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 10.0  # EOS is by far the best
    tokens = Sampler(CPU).sample(logits, make_batch([SamplingParams(temperature=0.0, min_tokens=1)], VOCAB,
                                                    eos=(2,))[1], make_batch([SamplingParams()], VOCAB)[0])
    assert tokens.token_ids.tolist() != [2]


def test_logprobs_equal_log_softmax_of_the_raw_logits():
    logits = _logits(3, seed=14)
    params = [SamplingParams(temperature=0.7, logprobs=5, repetition_penalty=1.5, seed=1),
              SamplingParams(temperature=0.0), SamplingParams(logprobs=0, top_k=3)]
    state, meta = make_batch(params, VOCAB, prompts=[[1, 2]] * 3)
    out = Sampler(CPU).sample(logits, meta, state)
    reference = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    for i in (0, 2):
        item, token = out.logprobs[i], out.token_ids[i]
        assert item.token_id == token
        torch.testing.assert_close(torch.tensor(item.logprob), reference[i, token], rtol=0, atol=1e-6)
        assert item.rank == int((reference[i] > reference[i, token]).sum()) + 1
        k = params[i].logprobs
        assert item.top_ids == reference[i].topk(k).indices.tolist()
        torch.testing.assert_close(torch.tensor(item.top_logprobs), reference[i].topk(k).values, rtol=0, atol=1e-6)


def test_sampled_logprobs_only_for_rows_that_ask():
    logits = _logits(3, seed=15)
    wire = sampled_logprobs(torch.log_softmax(logits, -1), torch.tensor([1, 2, 3]), np.array([-1, 2, -1]))
    assert wire[0] is None and wire[2] is None and wire[1].token_id == 2 and len(wire[1].top_ids) == 2
