"""Decode steps replayed from CUDA graphs: one graph per padded batch size.

A decode step of a small model is dominated by kernel launches (about ten per layer), not by
the GPU's work; a CUDA graph launches them all at once. The graph fixes every tensor's address
and shape, so the step's inputs are copied into static buffers first and the batch is padded up
to the next captured size.

Invariants:

* Only decode-only steps (one token per sequence) of at most ``max(capture_sizes)`` sequences
  replay a graph; every other step runs eagerly.
* A padding row has slot -1 (its K/V is not written: kernels/triton_cache_ops.py) and context
  length 0 (the decode kernel reads nothing for it); its hidden state is garbage and is never
  sampled, since the caller keeps only the first ``batch`` rows.
* The static block table is ``max_blocks_per_seq`` wide: the kernels read only the first
  ``ceil(seq_len / block_size)`` entries of a row, so columns left from earlier steps are unread.
* The returned hidden states are the graph's own output buffer: valid until the next replay.

How a graph is made is injected (`Capture`), so the buffer and padding logic is tested on CPU
with `eager_capture`, which re-runs the forward pass instead of replaying it.
"""

from __future__ import annotations

from typing import Callable

import torch

from worker.attention import AttentionMetadata
from worker.input_batch import StepInputs

# (forward) -> (replay, output): run `forward` into a fixed output tensor, repeatably.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]

MAX_CAPTURE_SIZE = 512  # sequences: larger decode batches are launch-bound no longer


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture, ascending: 1, 2, 4, then multiples of 8, up to max_num_seqs
    (capped at MAX_CAPTURE_SIZE), ending with that limit itself."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = sorted({s for s in (1, 2, 4, *range(8, limit + 1, 8)) if s <= limit} | {limit})
    return sizes


def eager_capture(forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for a CUDA graph (CPU tests): replay re-runs `forward` into the first output."""
    out = forward()

    def replay() -> None:
        out.copy_(forward())

    return replay, out


def cuda_capture(device: torch.device, warmup_runs: int = 2) -> Capture:
    """Capture into CUDA graphs sharing one memory pool (graphs replay one at a time, so their
    activations can share memory). Each forward pass is first run on a side stream, as torch
    asks, so lazy initialization (Triton compilation, cuBLAS workspaces) happens outside capture."""
    pool = torch.cuda.graph_pool_handle()

    def capture(forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
        return graph.replay, out

    return capture


class DecodeGraphs:
    """Static decode inputs and one replayable forward pass per size in `sizes`."""

    def __init__(self, forward: Forward, sizes: list[int], max_blocks_per_seq: int, device: torch.device):
        """`forward(input_ids, positions, meta)` is the model's forward pass over the KV cache."""
        if not sizes or sorted(sizes) != sizes or sizes[0] < 1:
            raise ValueError(f"capture sizes must be ascending and >= 1, got {sizes}")
        self.forward, self.sizes, self.device = forward, sizes, device
        n = sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token each
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                                 seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[:size + 1],
                                 decode_only=True)

    def capture(self, capture: Capture) -> None:
        """Capture every size, largest first (later, smaller graphs reuse the pool's memory).
        Every row is padding meanwhile, so capturing neither reads nor writes the KV cache."""
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        for size in reversed(self.sizes):
            meta = self._meta(size)
            self._graphs[size] = capture(
                lambda size=size, meta=meta: self.forward(self.input_ids[:size], self.positions[:size], meta))

    def fits(self, inputs: StepInputs) -> bool:
        """Whether this step can replay a graph: decode only, and few enough sequences."""
        return bool(self._graphs) and inputs.meta.decode_only and 0 < inputs.input_ids.shape[0] <= self.max_batch

    def padded_size(self, batch: int) -> int:
        """The smallest captured size >= batch (sequences)."""
        return next(s for s in self.sizes if s >= batch)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Copy the step into the static buffers, replay, return hidden states ``[batch, hidden]``
        (a view of the graph's output: read it before the next step)."""
        batch = inputs.input_ids.shape[0]
        size = self.padded_size(batch)
        meta = inputs.meta
        self.input_ids[:batch].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:batch].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:batch, :meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        if size > batch:  # rows a previous, larger step left: make them padding again
            self.slot_mapping[batch:size].fill_(-1)
            self.seq_lens[batch:size].zero_()
        replay, out = self._graphs[size]
        replay()
        return out[:batch]
