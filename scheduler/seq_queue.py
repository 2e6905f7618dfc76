"""A queue of sequences in policy order: the waiting and the swapped queues."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from scheduler.sequence import Sequence, SeqStatus


class SeqQueue:
    """Sequences best first by `Sequence.sort_key` (priority, arrival, seq id).

    A heap: push and pop cost O(log n). A preempted sequence keeps its key, so
    it returns ahead of everything of its priority that arrived after it.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float, int], Sequence]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Sequence]:
        return (seq for _, seq in self._heap)

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (seq.sort_key, seq))  # keys are unique: seqs are never compared

    def peek(self) -> Sequence:
        return self._heap[0][1]

    def pop(self) -> Sequence:
        return heapq.heappop(self._heap)[1]

    def remove(self, seq: Sequence) -> None:
        """O(n): only to run a suspect alone after a worker failure (scheduler/isolation.py)."""
        self._heap = [entry for entry in self._heap if entry[1] is not seq]
        heapq.heapify(self._heap)

    def remove_finished(self) -> None:
        """O(n): only after aborts, never per step."""
        self._heap = [entry for entry in self._heap if entry[1].status is not SeqStatus.FINISHED]
        heapq.heapify(self._heap)

    def drain(self) -> list[Sequence]:
        """Empty the queue; its sequences, best first."""
        seqs = [seq for _, seq in sorted(self._heap, key=lambda entry: entry[0])]
        self._heap = []
        return seqs
