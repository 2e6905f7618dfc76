"""Draft-model speculation on the worker: the draft proposes, the target verifies.

The plan marks a speculating row with `ScheduledSeq.num_draft_tokens` = K (its slots for positions
n+1..n+K are reserved after its last known token t_n at position n). Per step:

1. The draft runs on exactly the step's chunks as the target will (prefill chunks, plain decodes,
   every row whether or not it speculates), same positions and slots, in its own cache
   (worker/draft_model.py). A speculating row's logits at t_n give d_1 (greedy).
2. For j = 1..K: the draft runs d_j at position n+j (its slot) and, while j < K, its logits give
   d_(j+1). The last of these passes (d_K at n+K) only writes the draft's K/V: if the target
   accepts every proposal, the draft's cache must hold d_K there as the target's does.
3. The target verifies [t_n, d_1..d_K] through the existing path (`ScheduledSeq.spec_token_ids`,
   worker/input_batch.py, worker/spec_verify.py): every emitted token is the target's own sample.

Invariant: wherever the target's KV cache holds a token's K/V, the draft's holds that token's too
(the same slot). Accepted proposals were written by both (d_j == t_j); rejected slots are junk in
both and are overwritten by later tokens; preemption, swap and copy-on-write move both caches.
"""

from __future__ import annotations

import msgspec
import numpy as np
import torch

from shared.protocol import ScheduledSeq
from worker.attention import AttentionMetadata
from worker.draft_model import DraftModel
from worker.input_batch import InputBatch, StepInputs


class DraftProposer:
    """Stands in for `InputBatch.prepare` when a draft model is loaded (worker/model_runner.py)."""

    def __init__(self, draft: DraftModel, batch: InputBatch) -> None:
        self.draft = draft
        self.batch = batch
        self.device = batch.device

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Apply the step's block changes, run the draft over the step (proposals for the rows with
        `num_draft_tokens`), and return the target's inputs: with those proposals to verify."""
        batch = self.batch
        base = batch.prepare(scheduled)
        hidden = self.draft.forward(base.input_ids, base.positions, base.meta)
        spec = [(i, work.num_draft_tokens) for i, work in enumerate(scheduled) if work.num_draft_tokens]
        if not spec:
            return base  # no row speculates: the draft only kept its cache in step with the target's
        sample_of = {position: j for j, position in enumerate(base.sampled_positions)}
        missing = [scheduled[i].seq_id for i, _ in spec if i not in sample_of]
        if missing:
            raise ValueError(f"seqs {missing}: draft tokens for a chunk that does not reach the sequence's end")
        first = torch.tensor([sample_of[i] for i, _ in spec], dtype=torch.int64, device=self.device)
        k = np.array([num for _, num in spec], dtype=np.int64)
        drafted = torch.empty((len(spec), int(k.max())), dtype=torch.int64, device=self.device)
        drafted[:, 0] = self.draft.greedy(hidden.index_select(0, base.logits_indices.index_select(0, first)))
        seqs = [batch.seqs[scheduled[i].seq_id] for i, _ in spec]
        rows = np.array([seq.row for seq in seqs], dtype=np.int64)
        last = np.array([scheduled[i].num_computed_tokens for i, _ in spec], dtype=np.int64)  # t_n's position
        for j in range(1, int(k.max()) + 1):  # feed d_j at n + j
            active = np.nonzero(k >= j)[0]
            index = torch.from_numpy(active).to(self.device)
            ids = drafted.index_select(0, index)[:, j - 1].contiguous()
            positions = last[active] + j
            hidden = self.draft.forward(ids, self._tensor(positions), self._decode_meta(batch, rows[active], positions))
            more = np.nonzero(k[active] > j)[0]  # rows that still want d_(j+1)
            if len(more):
                picked = torch.from_numpy(more).to(self.device)
                drafted[index.index_select(0, picked), j] = self.draft.greedy(hidden.index_select(0, picked))
        proposals = drafted.tolist()
        verify = list(scheduled)
        for r, (i, num) in enumerate(spec):
            verify[i] = msgspec.structs.replace(scheduled[i], spec_token_ids=proposals[r][:num])
        # The block changes were applied above: the target's pass must not apply them again.
        verify = [msgspec.structs.replace(w, new_block_ids=[], block_table_len=-1, append_token_ids=[])
                  for w in verify]
        return batch.prepare(verify)

    def _decode_meta(self, batch: InputBatch, rows: np.ndarray, positions: np.ndarray) -> AttentionMetadata:
        """One token per row at `positions`, in the rows' slots of the shared block table."""
        table, block_size = batch.block_table, batch.block_size
        slots = table[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
        seq_lens = positions + 1
        max_blocks = int(-(-seq_lens.max() // block_size))
        return AttentionMetadata(
            slot_mapping=self._tensor(slots),
            block_tables=self._tensor(table[rows, :max_blocks], torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            query_start_loc=self._tensor(np.arange(len(rows) + 1), torch.int32),
            decode_only=True,
        )

    def _tensor(self, array: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=dtype)
