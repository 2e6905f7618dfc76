"""Which request kills the worker: suspects run alone until they sample a token.

A worker that dies or hangs with a step in flight (a segfault, the OOM killer, a
CUDA fault that takes the process down: no `WorkerError` to say which step) makes
every sequence of that step a *suspect*. The policy then runs each suspect alone,
one step at a time, until it samples a token (then it is cleared and joins the
others again). A suspect in flight at `CRASH_LIMIT` failures in a row (the first
one batched, the rest alone) is the likely cause: its request finishes with
finish_reason "error" instead of crashing every worker that would ever run it.
The others lose nothing; an operator's kill -9 now and then convicts nobody, as
a token between two failures clears a suspect.
"""

from __future__ import annotations

from scheduler.sequence import Sequence, SeqStatus

CRASH_LIMIT = 3  # worker failures in a row with a sequence in flight, the last CRASH_LIMIT - 1 alone


class Isolation:
    """The suspects: sequences with `crashes` > 0, each to be run alone (BatchPolicy)."""

    def __init__(self) -> None:
        self.suspects: set[Sequence] = set()

    def blame(self, in_flight: list[Sequence]) -> list[Sequence]:
        """The worker failed with `in_flight` scheduled: each becomes (more of) a suspect.
        Returns those at CRASH_LIMIT, to be failed by the caller."""
        convicted = []
        for seq in in_flight:
            if seq.status is SeqStatus.FINISHED:
                continue
            seq.crashes += 1
            if seq.crashes >= CRASH_LIMIT:
                self.suspects.discard(seq)
                convicted.append(seq)
            else:
                self.suspects.add(seq)
        return convicted

    def clear(self, seq: Sequence) -> None:
        """`seq` sampled a token: whatever kills the worker, it is not this sequence's next step."""
        seq.crashes = 0
        self.suspects.discard(seq)

    def next_suspect(self) -> Sequence | None:
        """The suspect to run now: one already running (a prefill in chunks) first, else the
        best waiting one; None when there are none (or only swapped ones, which come back in
        normal batches and are then run alone). O(suspects): empty but after a crash."""
        if not self.suspects:
            return None
        self.suspects = {seq for seq in self.suspects if seq.status is not SeqStatus.FINISHED}
        runnable = [seq for seq in self.suspects if seq.status in (SeqStatus.RUNNING, SeqStatus.WAITING)]
        if not runnable:
            return None
        return min(runnable, key=lambda seq: (seq.status is not SeqStatus.RUNNING, seq.sort_key))
