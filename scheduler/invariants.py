"""The Scheduler's invariants, checked after every step in tests (never on the serving path).

Between steps (no plan in flight), every running sequence has KV for exactly its computed
tokens, at least one token short of all it knows (the last sampled one, or a prefill chunk);
swapped ones keep their computed tokens in host blocks; waiting, fork-pending and parked ones
(beams waiting for their group's selection) hold no blocks and are not on the worker; every
unfinished sequence is in exactly one of those places. A running beam that reported its
candidates has every token computed, waiting for its siblings (scheduler/beam_search.py).
"""

from __future__ import annotations

from scheduler.sequence import Sequence, SeqStatus


def check_scheduler_invariants(sched, seqs: dict[int, Sequence], in_flight) -> None:
    """O(everything). `seqs`: the unfinished sequences; `in_flight`: the plan awaiting its result."""
    sched.block_manager.check_invariants()
    policy = sched.policy
    running, waiting, swapped = policy.running, list(policy.waiting), list(policy.swapped)
    pending = [child for seq in seqs.values() for child in seq.children]
    parked = [seq for seq in seqs.values() if seq.status is SeqStatus.BEAM_PARKED]
    if running != sorted(running, key=lambda s: s.sort_key):
        raise AssertionError("running is out of policy order")
    ids = [s.seq_id for s in running + waiting + swapped + pending + parked]
    if len(ids) != len(seqs) or set(ids) != seqs.keys():
        raise AssertionError("running + waiting + swapped + fork-pending disagree with the unfinished sequences")
    bm = sched.block_manager
    for seq in running:
        if seq.status is not SeqStatus.RUNNING or seq.block_table is not bm.block_table(seq.seq_id):
            raise AssertionError(f"running sequence {seq.seq_id} has status {seq.status} or a stale table")
        slots = bm.num_slots(seq.seq_id)
        # A beam that reported its candidates waits for its siblings with every token computed.
        if in_flight is None and not (slots == seq.num_computed_tokens < seq.compute_limit or
                                      slots == seq.num_computed_tokens == seq.num_tokens - 1 or
                                      (seq.request.beam is not None
                                       and slots == seq.num_computed_tokens == seq.num_tokens)):
            raise AssertionError(f"running sequence {seq.seq_id}: {seq.num_computed_tokens} of {seq.num_tokens} "
                                 f"tokens computed, {slots} slots")
    for seq in swapped:
        if seq.status is not SeqStatus.SWAPPED or not bm.is_swapped(seq.seq_id) or seq.on_worker:
            raise AssertionError(f"swapped sequence {seq.seq_id} has status {seq.status} or no host table")
        if bm.num_slots(seq.seq_id) != seq.num_computed_tokens:
            raise AssertionError(f"swapped sequence {seq.seq_id} lost track of its computed tokens")
    for seq in waiting + pending + parked:
        expected = (SeqStatus.WAITING if seq in waiting else
                    SeqStatus.BEAM_PARKED if seq in parked else SeqStatus.FORK_PENDING)
        if seq.status is not expected or seq.block_table or bm.has_table(seq.seq_id) or bm.is_swapped(seq.seq_id):
            raise AssertionError(f"sequence {seq.seq_id} holds blocks or has status {seq.status}")
        if seq.num_computed_tokens != 0 or seq.on_worker:
            raise AssertionError(f"waiting sequence {seq.seq_id} is computed or on the worker")
