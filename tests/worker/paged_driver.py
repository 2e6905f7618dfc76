"""Plays the scheduler against a `ModelRunner`, and reads logits both from our paged model and
from transformers: the helpers of tests/worker/test_model_vs_transformers.py and
tests/worker/test_random_checkpoints.py."""

from __future__ import annotations

import random

import torch

from shared.protocol import NewSeq, SamplingParams, ScheduledSeq, StepPlan
from worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


class PlanDriver:
    """Plays the scheduler: shuffled block ids, chunked prefill, one decode token per step."""

    def __init__(self, runner: ModelRunner, seed: int = 0):
        self.runner, self.block_size, self.step_id = runner, runner.config.worker.block_size, 0
        self.free = list(range(runner.kv_cache.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.next_seq_id = 1000 * seed

    def run(self, seqs: list[tuple[list[int], int]], max_new: int, chunk: int = 1 << 30,
            params: SamplingParams = GREEDY) -> list[list[int]]:
        """seqs: (known tokens, prompt_len). Returns the tokens each one generates in this run."""
        ids = list(range(self.next_seq_id, self.next_seq_id + len(seqs)))
        self.next_seq_id += len(seqs)
        tokens = {i: list(t) for i, (t, _) in zip(ids, seqs)}
        computed, blocks, generated = dict.fromkeys(ids, 0), {i: [] for i in ids}, {i: [] for i in ids}
        new_seqs = [NewSeq(i, list(t), p, [], params) for i, (t, p) in zip(ids, seqs)]
        while any(len(generated[i]) < max_new for i in ids):
            active = [i for i in ids if len(generated[i]) < max_new]
            scheduled = []
            for i in active:
                n = min(chunk, len(tokens[i]) - computed[i])
                need = -(-(computed[i] + n) // self.block_size) - len(blocks[i])
                new_blocks = [self.free.pop() for _ in range(need)]
                blocks[i] += new_blocks
                scheduled.append(ScheduledSeq(i, n, computed[i], new_blocks))
            result = self.runner.execute(StepPlan(self.step_id, scheduled, new_seqs))
            self.step_id, new_seqs = self.step_id + 1, []
            for work, token in zip(scheduled, result.sampled):
                i = work.seq_id
                computed[i] += work.num_tokens
                assert (token == -1) == (computed[i] < len(tokens[i]))
                if token != -1:
                    tokens[i].append(token)
                    generated[i].append(token)
        self.runner.execute(StepPlan(self.step_id, [], finished_seq_ids=ids))
        self.step_id += 1
        for i in ids:
            self.free += blocks[i]
        return [generated[i] for i in ids]


def paged_logits(runner: ModelRunner, prompts: list[list[int]], first_chunk: int) -> list[torch.Tensor]:
    """Teacher-forced logits of every position: one batched prefill of `first_chunk` tokens per
    prompt, then one token per prompt per step (decode-only steps once all prefills are done)."""
    batch, bs = runner.batch, runner.config.worker.block_size
    free = list(range(runner.kv_cache.num_blocks))
    random.Random(1).shuffle(free)
    for i, p in enumerate(prompts):
        batch.add(NewSeq(i, p, len(p), [free.pop() for _ in range(-(-len(p) // bs))], GREEDY))
    done, rows = [0] * len(prompts), [[] for _ in prompts]
    with torch.inference_mode():
        while any(d < len(p) for d, p in zip(done, prompts)):
            active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
            scheduled = [ScheduledSeq(i, first_chunk if done[i] == 0 else 1, done[i]) for i in active]
            scheduled = [ScheduledSeq(s.seq_id, min(s.num_tokens, len(prompts[s.seq_id]) - done[s.seq_id]),
                                      s.num_computed_tokens) for s in scheduled]
            inputs = batch.prepare(scheduled)
            assert inputs.meta.decode_only == all(s.num_tokens == 1 for s in scheduled)
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_cache.layers())
            logits = runner.model.compute_logits(hidden)
            start = 0
            for s in scheduled:
                rows[s.seq_id].append(logits[start : start + s.num_tokens])
                start += s.num_tokens
                done[s.seq_id] += s.num_tokens
    batch.drop(list(range(len(prompts))))
    return [torch.cat(r) for r in rows]


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


# ---- (1) the default GGUF model ------------------------------------------------------------
