"""Speculative decoding in the scheduler, with a fake worker that verifies proposals against the
toy model: same outputs as without speculation, proposals accepted, rollback of rejected slots
(blocks freed, worker tables truncated), stops inside an accepted run, preemption, n > 1; and the
draft-model method's slots (the fake worker drafts with a toy draft that is right two times in three)."""

from __future__ import annotations

from scheduler.scheduler import Scheduler
from scheduler.spec_ngram import propose_ngram
from shared.config import ServerConfig
from shared.protocol import SamplingParams, StepPlan, StepResult
from tests.scheduler.sched_harness import EOS, VOCAB, FakeWorker, Harness, WorkerSeq, add, reference_output


def copy_sample(history: list[int], output_index: int, seed: int) -> int:
    """A toy model that copies: the token after the last earlier occurrence of the last token,
    shifted by one now and then (so some proposals fail); EOS about never."""
    last = history[-1]
    for i in range(len(history) - 2, -1, -1):
        if history[i] == last:
            token = history[i + 1]
            break
    else:
        token = (last * 7 + 3) % VOCAB
    if (len(history) + output_index + seed) % 5 == 0:
        token = token % (VOCAB - 1) + 1
    return token or 1


class SpecFakeWorker(FakeWorker):
    """FakeWorker that writes proposals' KV and accepts them as a verifying worker would."""

    def apply(self, plan: StepPlan) -> None:
        for seq_id in plan.finished_seq_ids:
            del self.seqs[seq_id]
        for device, host in plan.swap_out:
            self.host[host] = list(self.kv[device])
        for host, device in plan.swap_in:
            self.kv[device] = list(self.host[host])
        sources = {src: list(self.kv[src]) for src, _ in plan.copy}
        for src, dst in plan.copy:
            self.kv[dst] = list(sources[src])
        new_ids = set()
        for new in plan.new_seqs:
            self.seqs[new.seq_id] = WorkerSeq(list(new.token_ids), list(new.block_ids), new.output_index,
                                              new.params.seed or 0)
            new_ids.add(new.seq_id)
        for work in plan.scheduled:
            seq = self.seqs[work.seq_id]
            if work.seq_id not in new_ids:
                if work.block_table_len >= 0:
                    del seq.block_ids[work.block_table_len:]
                seq.block_ids.extend(work.new_block_ids)
            end = work.num_computed_tokens + work.num_tokens + len(work.spec_token_ids) + work.num_draft_tokens
            assert len(seq.block_ids) == -(-end // self.block_size), "block table does not cover the chunk"

    draft = None  # (history, output_index, seed) -> token: the draft model of num_draft_tokens rows

    def proposal(self, work, seq: WorkerSeq) -> list[int]:
        """The row's proposed tokens: the plan's, or the draft's greedy run after the known tokens."""
        drafted = []
        for _ in range(work.num_draft_tokens):
            drafted.append(self.draft(seq.token_ids + drafted, seq.output_index, seq.seed))
        return list(work.spec_token_ids) + drafted

    def run(self, plan: StepPlan) -> StepResult:
        bs = self.block_size
        sampled, extra = [], []
        for work in plan.scheduled:
            seq = self.seqs[work.seq_id]
            chunk = seq.token_ids[work.num_computed_tokens:work.num_computed_tokens + work.num_tokens]
            spec = self.proposal(work, seq)
            for pos, token in enumerate(chunk + spec, start=work.num_computed_tokens):
                self.kv[seq.block_ids[pos // bs]][pos % bs] = token
            seq.num_computed = work.num_computed_tokens + work.num_tokens
            if seq.num_computed < len(seq.token_ids):
                sampled.append(-1)
                extra.append([])
                continue
            tokens = []
            for j in range(len(spec) + 1):
                history = [self.kv[seq.block_ids[pos // bs]][pos % bs] for pos in range(seq.num_computed + j)]
                assert history == seq.token_ids + tokens[:j], "corrupted KV"
                tokens.append(self.sample(history, seq.output_index, seq.seed))
                if j == len(spec) or tokens[j] != spec[j]:
                    break
            seq.token_ids.extend(tokens)
            seq.num_computed += len(tokens) - 1
            sampled.append(tokens[0])
            extra.append(tokens[1:])
        return StepResult(plan.step_id, sampled, extra_tokens=extra)


def spec_harness(k=4, num_blocks=1000, block_size=4, max_model_len=256, method="ngram", draft=None,
                 **settings) -> Harness:
    settings.setdefault("speculative_max_batch", 0)
    if method == "draft":
        settings["draft_model"] = "default"  # only validated here: the fake worker drafts with `draft`
    config = ServerConfig.from_settings(speculative_method=method, num_speculative_tokens=k, **settings)
    config.validate()
    sched = Scheduler(config.scheduler, num_device_blocks=num_blocks, block_size=block_size,
                      max_model_len=max_model_len, vocab_size=VOCAB, eos_token_ids=[EOS])
    harness = Harness(sched, copy_sample)
    harness.worker = SpecFakeWorker(block_size, copy_sample)
    harness.worker.draft = draft
    return harness


PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13, 11], [20, 21, 22, 23, 24, 25, 26, 27, 20, 21],
           [30, 31, 30, 31, 30, 32, 33, 30, 31]]


def test_propose_ngram_takes_longest_most_recent_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 2, 1, 3) == [4, 7]
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 3, 1, 3) == [4, 1, 2]
    assert propose_ngram([1, 2, 3], 3, 1, 3) == []
    assert propose_ngram([5, 5], 0, 1, 3) == []


def test_spec_outputs_match_reference_and_accept_proposals():
    h = spec_harness()
    params = dict(max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        h.add(add(f"r{i}", prompt, **params))
    h.run()
    for i, prompt in enumerate(PROMPTS):
        want, _ = reference_output(prompt, SamplingParams(**params), 0, max_model_len=256, sample=copy_sample)
        assert h.outputs[(f"r{i}", 0)] == want
    stats = h.scheduler.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_proposed_tokens"] > stats["spec_accepted_tokens"]
    assert stats["spec_acceptance_rate"] == round(stats["spec_accepted_tokens"] / stats["spec_proposed_tokens"], 4)
    assert stats["spec_mean_accepted_length"] == round(stats["spec_accepted_tokens"] / stats["spec_rows"], 4)
    assert sum(stats[f"spec_accepted_pos_{j}"] for j in range(4)) == stats["spec_accepted_tokens"]
    assert stats["tokens_generated"] == 4 * 40
    assert stats["steps"] < 4 * 40  # several tokens per step
    assert stats["kv_blocks_used"] == 0


def test_spec_rollback_frees_blocks_and_truncates_worker_table():
    h = spec_harness(k=8, block_size=2)
    h.add(add("r", PROMPTS[3], max_tokens=60, ignore_eos=True))
    truncated = 0
    while h.scheduler.has_work():
        plan = h.step()
        truncated += sum(1 for w in plan.scheduled if w.block_table_len >= 0)
        for seq in h.scheduler.policy.running:
            # Between steps a sequence reserves only its computed tokens: rejected slots were given back.
            assert h.scheduler.block_manager.num_slots(seq.seq_id) == seq.num_computed_tokens
    assert truncated > 0
    want, _ = reference_output(PROMPTS[3], SamplingParams(max_tokens=60, ignore_eos=True), 0, max_model_len=256,
                               sample=copy_sample)
    assert h.outputs[("r", 0)] == want


def test_spec_stop_inside_accepted_run_emits_nothing_after_it():
    prompt = PROMPTS[1]
    free_run, _ = reference_output(prompt, SamplingParams(max_tokens=30, ignore_eos=True), 0, max_model_len=256,
                                   sample=copy_sample)
    stop = free_run[5]
    h = spec_harness(k=8)
    h.add(add("r", prompt, max_tokens=30, stop_token_ids=[stop], ignore_eos=True))
    h.add(add("m", prompt, max_tokens=3, ignore_eos=True))  # max_tokens inside a run
    h.run()
    assert h.outputs[("r", 0)] == free_run[:free_run.index(stop) + 1]
    assert h.finished[("r", 0)].finish_reason == "stop"
    assert h.outputs[("m", 0)] == free_run[:3] and h.finished[("m", 0)].finish_reason == "length"


def test_spec_with_preemption_and_n2_matches_reference():
    h = spec_harness(k=4, num_blocks=24, block_size=2, max_model_len=64)
    params = dict(max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        h.add(add(f"r{i}", prompt, n=2, seed=i, **params))
    h.run()
    assert h.scheduler.stats()["preemptions"] > 0
    for i, prompt in enumerate(PROMPTS):
        for index in range(2):
            want, _ = reference_output(prompt, SamplingParams(seed=i, **params), index, max_model_len=64,
                                       sample=copy_sample)
            assert h.outputs[(f"r{i}", index)] == want
    assert h.scheduler.stats()["spec_accepted_tokens"] > 0


def test_spec_off_by_default_and_penalised_rows_speculate():
    # Penalties no longer exclude a row: the worker counts each proposal for the rows after it.
    h = spec_harness(k=4)
    h.add(add("p", PROMPTS[0], max_tokens=10, ignore_eos=True, presence_penalty=0.5))
    h.run()
    assert h.scheduler.stats()["spec_proposed_tokens"] > 0
    assert any(w.spec_token_ids for plan in h.plans for w in plan.scheduled)
    config = ServerConfig.from_settings()
    assert config.scheduler.speculative_method == "none" and config.scheduler.num_speculative_tokens == 0


def test_spec_length_adapts_to_acceptance():
    h = spec_harness(k=8)
    # Four tokens in a hashed order: n-grams always match, proposals mostly fail.
    h.worker.sample = lambda history, index, seed: 10 + (len(history) * 2654435761 >> 7) % 4
    h.add(add("r", [10, 11, 12, 13, 10, 12, 11, 13, 10], max_tokens=60, ignore_eos=True))
    allowed = []  # the proposal length the sequence may use, before each step
    while h.scheduler.has_work():
        seq = h.scheduler.policy.running[0] if h.scheduler.policy.running else None
        if seq is not None:
            allowed.append(h.scheduler._spec.length_for(seq))
        h.step()
    assert allowed[0] == 8 and min(allowed) <= 3  # rejected proposals shrink the next ones
    assert h.scheduler.stats()["spec_accepted_tokens"] < h.scheduler.stats()["spec_proposed_tokens"] / 2


def test_spec_switched_off_in_large_batches():
    h = spec_harness(k=4, speculative_max_batch=2)
    for i, prompt in enumerate(PROMPTS):
        h.add(add(f"r{i}", prompt, max_tokens=20, ignore_eos=True))
    h.run()
    assert all(not w.spec_token_ids for plan in h.plans if len(plan.scheduled) > 2 for w in plan.scheduled)
    stats = h.scheduler.stats()
    assert stats["spec_steps_skipped"] > 0
    for i, prompt in enumerate(PROMPTS):
        want, _ = reference_output(prompt, SamplingParams(max_tokens=20, ignore_eos=True), 0, max_model_len=256,
                                   sample=copy_sample)
        assert h.outputs[(f"r{i}", 0)] == want


def half_right_draft(history: list[int], output_index: int, seed: int) -> int:
    """A draft that agrees with copy_sample about two times in three."""
    token = copy_sample(history, output_index, seed)
    return token if len(history) % 3 else token % (VOCAB - 1) + 1


def test_draft_slots_match_reference_with_preemption_and_n2():
    h = spec_harness(k=3, num_blocks=24, block_size=2, max_model_len=64, method="draft", draft=half_right_draft)
    params = dict(max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        h.add(add(f"r{i}", prompt, n=2, seed=i, **params))
    h.run()
    stats = h.scheduler.stats()
    assert stats["preemptions"] > 0
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]
    for i, prompt in enumerate(PROMPTS):
        for index in range(2):
            want, _ = reference_output(prompt, SamplingParams(seed=i, **params), index, max_model_len=64,
                                       sample=copy_sample)
            assert h.outputs[(f"r{i}", index)] == want
    drafted = [w for plan in h.plans for w in plan.scheduled if w.num_draft_tokens]
    assert drafted and all(not w.spec_token_ids for w in drafted)  # slots only: the worker's draft proposes
    assert stats["kv_blocks_used"] == 0
    # The finishing deltas carry each output's totals; together they are the scheduler's.
    assert sum(d.spec_proposed for d in h.finished.values()) == stats["spec_proposed_tokens"]
    assert sum(d.spec_accepted for d in h.finished.values()) == stats["spec_accepted_tokens"]


def test_a_draft_that_never_hits_only_probes():
    """Rejected proposals still cost a wider forward: below MIN_ACCEPTANCE a sequence proposes once
    every PROBE_EVERY eligible steps, and its output stays the reference's."""
    from scheduler.spec_decode import MIN_ACCEPTANCE, PROBE_EVERY

    def wrong_draft(history, output_index, seed):
        return copy_sample(history, output_index, seed) % (VOCAB - 1) + 1  # never the target's token

    h = spec_harness(k=4, method="draft", draft=wrong_draft)
    params = dict(max_tokens=120, ignore_eos=True)
    h.add(add("r", PROMPTS[0], **params))
    h.run()
    want, _ = reference_output(PROMPTS[0], SamplingParams(**params), 0, max_model_len=256, sample=copy_sample)
    assert h.outputs[("r", 0)] == want
    proposing = [i for i, plan in enumerate(h.plans) for w in plan.scheduled if w.num_draft_tokens]
    stats = h.scheduler.stats()
    assert stats["spec_accepted_tokens"] == 0
    # The running rate starts at 1.0 and falls by 0.7 per step: under the floor after a few steps,
    # then one probe every PROBE_EVERY steps.
    falling = next(n for n in range(1, 20) if 0.7 ** n < MIN_ACCEPTANCE)
    assert proposing[:falling] == list(range(proposing[0], proposing[0] + falling))
    gaps = {b - a for a, b in zip(proposing[falling:], proposing[falling + 1:])}
    assert gaps == {PROBE_EVERY}, gaps
    assert len(proposing) < falling + len(h.plans) // PROBE_EVERY + 2
