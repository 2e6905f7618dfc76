"""Beam search test helpers: a toy model's next-token logprobs, a fake worker that returns beam
candidates, and an independent reference: a NumPy transcription of transformers' `_beam_search`
(generation/utils.py, 5.x) for one prompt, dummy beams at -1e9 and all."""

from __future__ import annotations

import zlib

import numpy as np
from sched_harness import EOS, VOCAB, FakeWorker, Harness

from shared.protocol import BeamCandidates, StepPlan, StepResult


def toy_logprobs(history: list[int]) -> np.ndarray:
    """log_softmax of pseudo-random logits that depend on the last three tokens and the length;
    EOS grows likelier with length, so hypotheses end at different lengths."""
    key = zlib.crc32(np.asarray(history[-3:] + [len(history)], dtype=np.int64).tobytes())
    logits = np.random.default_rng(key).normal(0.0, 2.0, VOCAB)
    logits[EOS] += 0.15 * len(history) - 2.0
    logits -= logits.max()
    return logits - np.log(np.exp(logits).sum())


class BeamWorker(FakeWorker):
    """The FakeWorker, plus beam rows: appends the scheduler's chosen tokens, returns top-K
    candidates for a beam row that reached its end and appends nothing for it."""

    def apply(self, plan: StepPlan) -> None:
        new_ids = {new.seq_id for new in plan.new_seqs}
        for work in plan.scheduled:
            if work.append_token_ids:
                assert work.seq_id not in new_ids, "a NewSeq carries its tokens"
                self.seqs[work.seq_id].token_ids.extend(work.append_token_ids)
        super().apply(plan)

    def run(self, plan: StepPlan) -> StepResult:
        beam_rows = {i: w.num_candidates for i, w in enumerate(plan.scheduled) if w.num_candidates}
        saved = {i: list(self.seqs[plan.scheduled[i].seq_id].token_ids) for i in beam_rows}
        result = super().run(plan)
        result.candidates = [None] * len(plan.scheduled)
        for i, k in beam_rows.items():
            seq = self.seqs[plan.scheduled[i].seq_id]
            if result.sampled[i] < 0:
                continue
            seq.token_ids = saved[i]  # the toy sample was appended by FakeWorker.run: undo it
            lp = toy_logprobs(seq.token_ids)
            top = np.argsort(-lp, kind="stable")[:k]
            result.candidates[i] = BeamCandidates(top.tolist(), lp[top].tolist())
            result.sampled[i] = -1
        return result


class BeamHarness(Harness):
    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.worker = BeamWorker(scheduler.block_manager.block_size)


def reference_beam_search(prompt: list[int], *, width: int, n: int, max_new: int, length_penalty: float = 1.0,
                          early_stopping: bool | str = False, eos: frozenset[int] = frozenset({EOS})):
    """[(generated tokens, score)] best first, n of them, as transformers computes them."""
    k = max(2, 1 + len(eos)) * width
    prompt_len = cur = len(prompt)
    running = [list(prompt) for _ in range(width)]
    running_scores = np.array([0.0] + [-1e9] * (width - 1))
    fin_seqs: list[list[int]] = [[] for _ in range(width)]
    fin_scores = np.full(width, -1e9)
    is_fin = np.zeros(width, dtype=bool)
    unsatisfied = True
    while True:
        acc = np.stack([toy_logprobs(s) for s in running]) + running_scores[:, None]
        flat = acc.reshape(-1)
        idx = np.argsort(-flat, kind="stable")[:k]
        topk_lp, beam, tok = flat[idx], idx // VOCAB, idx % VOCAB
        topk_seqs = [running[b] + [int(t)] for b, t in zip(beam, tok)]
        hits = np.array([int(t) in eos for t in tok]) | (cur + 1 >= prompt_len + max_new)
        run_lp = topk_lp + hits * -1e9
        nxt = np.argsort(-run_lp, kind="stable")[:width]
        did = hits & (np.arange(k) < width)
        scores = topk_lp / ((cur + 1 - prompt_len) ** length_penalty)
        scores = scores + float(is_fin.all() and early_stopping is True) * -1e9
        scores = scores + float(not unsatisfied) * -1e9 + (~did) * -1e9
        merged_scores = np.concatenate([fin_scores, scores])
        merged_seqs = fin_seqs + topk_seqs
        merged_fin = np.concatenate([is_fin, did])
        order = np.argsort(-merged_scores, kind="stable")[:width]
        fin_seqs = [merged_seqs[i] for i in order]
        fin_scores, is_fin = merged_scores[order], merged_fin[order]
        running, running_scores = [topk_seqs[i] for i in nxt], run_lp[nxt]
        cur += 1
        length = max_new if early_stopping == "never" and length_penalty > 0 else cur - prompt_len
        best = running_scores[0] / length ** length_penalty
        worst = np.where(is_fin, fin_scores.min(), -1e9)
        unsatisfied = unsatisfied and bool(np.any(best > worst))
        open_beam = not (is_fin.all() and early_stopping is True)
        if not (unsatisfied and open_beam and not hits.all()):
            break
    return [(fin_seqs[i][prompt_len:], float(fin_scores[i])) for i in range(n)]
