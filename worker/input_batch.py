"""The persistent batch: every sequence the worker knows, kept between steps.

The scheduler sends changes, not snapshots (shared/protocol.py): a `NewSeq` once, then only
appended block ids and token counts. This file holds the accumulated state and turns one
step's `ScheduledSeq` list into the model's flat input tensors.

Invariants per sequence: ``token_ids`` holds every known token (prompt + generated, including
the latest sampled one); ``block_ids`` is its block table in logical order and is mirrored in row
``row`` of the persistent numpy table; a step computes tokens
``[num_computed_tokens, num_computed_tokens + num_tokens)`` and samples when that range ends at
``len(token_ids)``. A beam row (``ScheduledSeq.num_candidates``) appends no sampled token: the one
the scheduler chose arrives in its next ``append_token_ids`` (worker/beam_candidates.py).

Sampling parameters and penalty counts of each row live in `SamplingState` (worker/sampling_state.py),
set when a sequence is added and updated in place after each sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from shared.protocol import NewSeq, SamplingParams, ScheduledSeq
from worker.attention import AttentionMetadata
from worker.sampling_state import SamplingMetadata, SamplingState


@dataclass
class SeqState:
    seq_id: int
    token_ids: list[int]
    prompt_len: int  # tokens
    block_ids: list[int]
    params: SamplingParams
    output_index: int  # which of the request's n outputs (part of the seeded-sampling key)
    num_computed_tokens: int  # tokens whose K/V are in the cache
    row: int  # row of the persistent block table
    # Prompt logprobs computed so far, sent whole with the first sampled token; None when not
    # wanted: params.prompt_logprobs unset, output_index > 0 (output 0 reports them), or a token
    # was already generated (so they were sent before a preemption).
    prompt_logprobs: list | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


@dataclass
class StepInputs:
    """One step's model inputs (on the device) and what to sample."""

    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # int64 [num_sampled]: rows of the hidden states to sample
    sampled_positions: list[int]  # index into plan.scheduled of each sampled row
    sampled_seqs: list[SeqState]  # the sequence of each sampled row
    sampling: SamplingMetadata | None  # None when no row samples
    # (sequence, flat index of its first chunk token, that token's position, count): chunk tokens
    # whose logits predict a prompt token, for sequences that want prompt logprobs.
    prompt_logprob_spans: list[tuple[SeqState, int, int, int]]
    # Speculative rows (worker/spec_verify.py): (index into sampled_positions, sequence, proposal).
    # Their verification logits follow the first len(sampled_positions) rows, len(proposal) each, in order.
    spec_rows: list[tuple[int, SeqState, list[int]]] = field(default_factory=list)


class InputBatch:
    def __init__(self, block_size: int, max_model_len: int, device: torch.device, initial_rows: int = 64,
                 vocab_size: int | None = None, eos_token_ids: tuple[int, ...] | list[int] = ()):
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.device = device
        self.seqs: dict[int, SeqState] = {}
        self._block_table = np.zeros((initial_rows, self.max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(initial_rows - 1, -1, -1))
        self.sampling = SamplingState(initial_rows, vocab_size, device, eos_token_ids)

    @property
    def block_table(self) -> np.ndarray:
        """The persistent block table (row `SeqState.row`: that sequence's blocks); read-only outside."""
        return self._block_table

    # ---- state changes ----------------------------------------------------------------------

    def drop(self, seq_ids: list[int]) -> None:
        """Forget finished (or preempted) sequences; unknown ids are ignored."""
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self._free_rows.append(seq.row)

    def add(self, new: NewSeq) -> None:
        """Register a sequence. A known seq_id is replaced: that is how a preempted or swapped
        sequence comes back with a new block table."""
        self.drop([new.seq_id])
        if not 0 < new.prompt_len <= len(new.token_ids):
            raise ValueError(f"seq {new.seq_id}: prompt_len {new.prompt_len} with {len(new.token_ids)} tokens")
        seq = SeqState(new.seq_id, list(new.token_ids), new.prompt_len, [], new.params, new.output_index,
                       num_computed_tokens=0, row=self._take_row())
        self.seqs[new.seq_id] = seq
        self._append_blocks(seq, new.block_ids)
        self.sampling.set_row(seq.row, new.params, new.output_index, seq.token_ids, new.prompt_len)
        if new.params.prompt_logprobs is not None and new.output_index == 0 and seq.num_generated == 0:
            seq.prompt_logprobs = []

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._block_table.shape[0]
            self._block_table = np.concatenate([self._block_table, np.zeros_like(self._block_table)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
            self.sampling.grow(2 * old)
        return self._free_rows.pop()

    def _append_blocks(self, seq: SeqState, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start, end = len(seq.block_ids), len(seq.block_ids) + len(block_ids)
        if end > self.max_blocks_per_seq:
            raise ValueError(f"seq {seq.seq_id}: {end} blocks exceed max_model_len {self.max_model_len} tokens")
        seq.block_ids.extend(block_ids)
        self._block_table[seq.row, start:end] = block_ids

    # ---- one step ---------------------------------------------------------------------------

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Append this step's new blocks and build the flat inputs of `scheduled`, in order."""
        batch = len(scheduled)
        rows = np.empty(batch, dtype=np.int64)
        starts = np.empty(batch, dtype=np.int64)  # tokens already computed
        counts = np.empty(batch, dtype=np.int64)  # tokens this step
        input_ids: list[int] = []
        sampled_positions: list[int] = []
        sampled_seqs: list[SeqState] = []
        spans: list[tuple[SeqState, int, int, int]] = []
        flat_start = 0
        sample_flat: list[int] = []  # flat index of each sampled row's last known token
        sample_index: list[int] = []  # each sampled row's next token index among the generated ones
        extra_flat, extra_rows, extra_index = [], [], []  # speculative positions 1..k: flat index, row, token index
        spec_rows: list[tuple[int, SeqState, list[int]]] = []
        extra_adds: list[tuple[int, int]] = []  # (speculative row, proposal token) for penalty counts
        for i, work in enumerate(scheduled):
            seq = self.seqs.get(work.seq_id)
            if seq is None:
                raise ValueError(f"seq {work.seq_id} is scheduled but was never registered")
            if work.block_table_len >= 0:  # blocks of rejected proposals were freed
                del seq.block_ids[work.block_table_len:]
            self._append_blocks(seq, work.new_block_ids)
            if work.append_token_ids:  # a beam's token, chosen by the scheduler after the last step
                seq.token_ids.extend(work.append_token_ids)
            start, end = work.num_computed_tokens, work.num_computed_tokens + work.num_tokens
            spec = work.spec_token_ids
            if work.num_tokens < 1 or start < 0 or end > len(seq.token_ids) or (spec and end != len(seq.token_ids)):
                raise ValueError(f"seq {seq.seq_id}: tokens [{start}, {end}) of {len(seq.token_ids)} known"
                                 f"{' with proposals' if spec else ''}")
            if end + len(spec) > self.max_model_len:
                raise ValueError(f"seq {seq.seq_id}: {end + len(spec)} tokens exceed max_model_len "
                                 f"{self.max_model_len}")
            if end + len(spec) > len(seq.block_ids) * self.block_size:
                raise ValueError(f"seq {seq.seq_id}: {end + len(spec)} tokens but {len(seq.block_ids)} blocks")
            if work.num_tokens == 1:
                input_ids.append(seq.token_ids[start])
            else:
                input_ids.extend(seq.token_ids[start:end])
            rows[i], starts[i], counts[i] = seq.row, start, work.num_tokens + len(spec)
            if end == len(seq.token_ids):
                if spec:  # verify: logits at every proposal too (the extend path, k + 1 positions)
                    input_ids.extend(spec)
                    spec_rows.append((len(sampled_positions), seq, list(spec)))
                    last = flat_start + work.num_tokens - 1
                    extra_flat.extend(range(last + 1, last + 1 + len(spec)))
                    extra_rows.extend([seq.row] * len(spec))
                    extra_index.extend(range(end - seq.prompt_len + 1, end - seq.prompt_len + 1 + len(spec)))
                    for j in range(len(spec)):  # the row after proposal j counts proposals 0..j as generated
                        extra_adds.extend((len(extra_rows) - len(spec) + j, token) for token in spec[:j + 1])
                sample_flat.append(flat_start + work.num_tokens - 1)
                sample_index.append(end - seq.prompt_len)
                sampled_positions.append(i)
                sampled_seqs.append(seq)
            if seq.prompt_logprobs is not None and start != len(seq.prompt_logprobs):
                # Positions were skipped (a prefix-cache hit): their logits do not exist. Send none
                # rather than a list that does not line up with the prompt.
                seq.prompt_logprobs = None
            if seq.prompt_logprobs is not None and start < seq.prompt_len - 1:
                # Position p predicts token p + 1: positions [start, min(end, prompt_len - 1)).
                spans.append((seq, flat_start, start, min(end, seq.prompt_len - 1) - start))
            flat_start += work.num_tokens + len(spec)

        seq_lens = starts + counts
        query_start_loc = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        # Position of every flat token: its sequence's start plus its index within the chunk.
        token_seq = np.repeat(np.arange(batch), counts)
        positions = np.arange(num_tokens) - query_start_loc[:-1][token_seq] + starts[token_seq]
        block_of_token = self._block_table[rows[token_seq], positions // self.block_size].astype(np.int64)
        slot_mapping = block_of_token * self.block_size + positions % self.block_size
        max_blocks = int(-(-seq_lens.max() // self.block_size)) if batch else 0
        block_tables = self._block_table[rows, :max_blocks]

        to_device = self._to_device
        meta = AttentionMetadata(
            slot_mapping=to_device(slot_mapping, torch.int64),
            block_tables=to_device(block_tables, torch.int32),
            seq_lens=to_device(seq_lens, torch.int32),
            query_start_loc=to_device(query_start_loc, torch.int32),
            decode_only=bool(batch) and bool((counts == 1).all()),
        )
        logits_indices = np.array(sample_flat + extra_flat, dtype=np.int64)
        sampling = None
        if sampled_seqs:
            # Each row's next token index among the generated ones: a proposal's verification row is
            # the same row one index further, so seeded noise matches the non-speculative step's.
            sampled_rows = np.concatenate([rows[sampled_positions], np.array(extra_rows, dtype=np.int64)])
            generated_index = np.array(sample_index + extra_index, dtype=np.int64)
            count_adds = None
            if extra_adds:
                adds = np.array(extra_adds, dtype=np.int64)
                count_adds = (adds[:, 0] + len(sample_flat), adds[:, 1])
            sampling = self.sampling.metadata(sampled_rows, generated_index, count_adds)
        return StepInputs(
            input_ids=to_device(np.asarray(input_ids, dtype=np.int64), torch.int64),
            positions=to_device(positions, torch.int64),
            meta=meta,
            logits_indices=to_device(logits_indices, torch.int64),
            sampled_positions=sampled_positions,
            sampled_seqs=sampled_seqs,
            sampling=sampling,
            prompt_logprob_spans=spans,
            spec_rows=spec_rows,
        )

    def _to_device(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def record(self, scheduled: list[ScheduledSeq], inputs: StepInputs, sampled: list[int],
               sampled_tensor: torch.Tensor | None = None) -> None:
        """After the forward pass: advance computed counts, append each sampled token (and count
        it for penalties, from `sampled_tensor`, the same ids on the device)."""
        for work in scheduled:
            self.seqs[work.seq_id].num_computed_tokens = work.num_computed_tokens + work.num_tokens
        for position, seq, token in zip(inputs.sampled_positions, inputs.sampled_seqs, sampled):
            if not scheduled[position].num_candidates:  # a beam row's token is the scheduler's to choose
                seq.token_ids.append(token)
        if inputs.sampling is not None and sampled:
            if sampled_tensor is None:
                sampled_tensor = torch.tensor(sampled, dtype=torch.int64, device=self.device)
            # rows beyond the sampled ones are speculative verification rows (worker/spec_verify.py)
            self.sampling.count_sampled(inputs.sampling.rows[:len(sampled)], sampled_tensor)
