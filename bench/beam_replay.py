"""Beam search's KV blocks, shared versus a full copy per beam: ShareGPT requests replayed through
the real Scheduler and BlockManager with beam search on (no model: a replay worker returns
candidates), for bench/kv_utilization.py.

Every request runs to its real ShareGPT output length (ignore_eos, max_tokens = that length).
Candidate scores are a toy: pseudo-random logprobs seeded by the beam's last tokens, so beams fork
and are pruned as the search goes, as with a model; what is measured is only memory. The
scheduler counts, at each selection step, the device blocks its live beams hold (a shared block
once: `beam_kv_blocks_shared`) and what a copy per beam would hold (`beam_kv_blocks_unshared`);
saved = 1 - shared / unshared, summed over every step of every request, as the paper's Fig. 15
compares memory with and without sharing.
"""

from __future__ import annotations

import zlib

import numpy as np

from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import AddRequest, BeamCandidates, SamplingParams, StepResult

VOCAB = 1 << 17  # as bench/kv_utilization.py: above any tokenizer the prompts come from
EOS = 0


def toy_candidates(history: list[int], k: int) -> BeamCandidates:
    """k distinct token ids (never EOS) with log-probabilities, best first."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(history[-4:] + [len(history)], dtype=np.int64).tobytes()))
    logits = rng.normal(0.0, 2.0, k)
    logprobs = np.sort(logits - np.log(np.exp(logits).sum()) - 0.1)[::-1]
    base = int(rng.integers(0, VOCAB))
    ids = [(base + 7919 * i) % (VOCAB - 1) + 1 for i in range(k)]
    return BeamCandidates(ids, logprobs.tolist())


def replay_beams(requests, *, width: int, block_size: int, num_blocks: int, max_model_len: int) -> dict:
    """Every request at once with `width` beams; returns the scheduler's beam figures."""
    config = ServerConfig.from_settings(max_num_seqs=256, max_num_batched_tokens=4096, enable_prefix_caching=False)
    sched = Scheduler(config.scheduler, num_device_blocks=num_blocks, block_size=block_size,
                      max_model_len=max_model_len, vocab_size=VOCAB, eos_token_ids=[EOS])
    for i, (prompt, output) in enumerate(requests):
        params = SamplingParams(use_beam_search=True, best_of=width, n=1, temperature=0.0, max_tokens=len(output),
                                ignore_eos=True)
        assert sched.add_request(AddRequest(f"r{i}", prompt, params, float(i)), b"bench") is None
    steps = 0
    while sched.has_work():
        plan = sched.schedule()
        candidates = []
        for work in plan.scheduled:
            seq = sched.get_sequence(work.seq_id)
            ends = work.num_computed_tokens + work.num_tokens == seq.num_tokens
            candidates.append(toy_candidates(seq.token_ids, work.num_candidates) if ends else None)
        sched.update(StepResult(plan.step_id, [-1] * len(plan.scheduled), candidates=candidates))
        steps += 1
    stats = sched.stats()
    shared, unshared = stats["beam_kv_blocks_shared"], stats["beam_kv_blocks_unshared"]
    return {"width": width, "block_steps_shared": shared, "block_steps_copy_per_beam": unshared,
            "saved": 1 - shared / max(1, unshared), "steps": steps, "forks": stats["beam_forks"],
            "blocks_copied": stats["blocks_copied"], "preemptions": stats["preemptions"]}
