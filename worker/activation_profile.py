"""How much device memory a step's activations need at most, measured once at load (CUDA only).

The KV cache gets what is left after the weights and this peak (worker/kv_cache.py), so the
worst step the scheduler may send (max_num_batched_tokens prompt tokens, max_num_seqs rows
sampled with every sampling stage on) must fit beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from shared.protocol import MAX_LOGPROBS, NewSeq, SamplingParams, ScheduledSeq
from worker.input_batch import InputBatch
from worker.kv_cache import allocate_kv_cache
from worker.sampler import Sampler
from worker.sampling_state import SamplingState

if TYPE_CHECKING:
    from worker.model_runner import ModelRunner


@torch.inference_mode()
def profile_activation_peak(runner: "ModelRunner") -> int:
    """Peak bytes above the weights of a forward pass over max_num_batched_tokens prompt tokens
    plus sampling of max_num_seqs rows, on a throwaway KV cache (its bytes excluded)."""
    cfg, a, bs = runner.config, runner.args, runner.config.worker.block_size
    lens, left = [], runner.max_num_batched_tokens
    while left > 0:
        lens.append(min(left, runner.max_model_len))
        left -= lens[-1]
    num_blocks = sum(-(-n // bs) for n in lens)
    cache = allocate_kv_cache(a.num_layers, num_blocks, bs, runner.num_kv_heads, a.head_dim, runner.dtype,
                              runner.device)
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    baseline = torch.cuda.memory_allocated(runner.device)
    batch = InputBatch(bs, runner.max_model_len, runner.device, initial_rows=len(lens))
    next_block, scheduled = 0, []
    for i, n in enumerate(lens):
        blocks = list(range(next_block, next_block + -(-n // bs)))
        next_block += len(blocks)
        batch.add(NewSeq(seq_id=i, token_ids=[0] * n, prompt_len=n, block_ids=blocks, params=SamplingParams()))
        scheduled.append(ScheduledSeq(seq_id=i, num_tokens=n, num_computed_tokens=0))
    inputs = batch.prepare(scheduled)
    hidden = runner.model(inputs.input_ids, inputs.positions, inputs.meta, cache.layers())
    rows = hidden[torch.arange(cfg.scheduler.max_num_seqs, device=runner.device) % hidden.shape[0]]
    logits = runner.compute_logits(rows)  # None on ranks other than 0: they do not sample
    if logits is not None:
        # Every sampling stage at once; the penalty state is as large as the real batch's (2 rows per seq).
        profile_params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, seed=1,
                                        repetition_penalty=1.1, logprobs=MAX_LOGPROBS)
        state = SamplingState(2 * cfg.scheduler.max_num_seqs, a.vocab_size, runner.device)
        for row in range(cfg.scheduler.max_num_seqs):
            state.set_row(row, profile_params, 0, [0, 0], 1)
        num_seqs = cfg.scheduler.max_num_seqs
        meta = state.metadata(np.arange(num_seqs), np.zeros(num_seqs, dtype=np.int64))
        Sampler(runner.device).sample(logits, meta, state)
        del state, meta
    torch.cuda.synchronize(runner.device)
    peak = torch.cuda.max_memory_allocated(runner.device) - baseline
    del cache, hidden, rows, logits, inputs
    torch.cuda.empty_cache()
    return max(0, peak)
