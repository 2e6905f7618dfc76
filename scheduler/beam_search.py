"""Beam search in the scheduler: beams are sequences of one request that share blocks.

A beam-search request starts as one sequence (the prompt). Each step every live beam's row
returns its top K candidates (`StepResult.candidates`: no token is appended by the worker); once
every live beam of a group has reported, `BeamGroup.select` picks the next beams and this
class applies the choice to sequences and block tables:

* a parent chosen once continues as itself: the chosen token is appended (the worker gets it in
  the next `ScheduledSeq.append_token_ids`, counted by `Sequence.pending_tokens`);
* a parent chosen k > 1 times forks k - 1 new sequences sharing its whole block table
  (`BlockManager.fork`): the shared partial last block is copied on each one's first append
  (copy-on-write), full blocks stay shared for good; no prefix is computed twice;
* a parent not chosen is finished (its blocks freed, or kept shared by its children).

Beams advance together: one that reported waits (running, holding its blocks, nothing to compute)
for its siblings. When a sibling is out of the running set (preempted, not admitted yet) the
waiting ones are parked (`SeqStatus.BEAM_PARKED`: blocks freed, in no queue) so a partial group
never holds memory its missing beams need: the group is preempted and resumed as a unit. A parked
beam's candidates are kept; after the selection its continuations wait to be recomputed (prefix
caching finds their full blocks).

Nothing streams: when the search ends, the n best hypotheses go out as one delta each (indexes
0..n-1, best first), with `cumulative_logprob` and `beam_score`.
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.beam_group import BeamGroup, Hypothesis
from scheduler.block_manager import BlockManager
from scheduler.policy import BatchPolicy
from scheduler.sequence import Request, SeqStatus, Sequence
from scheduler.token_outcome import time_first_token
from shared.protocol import BeamCandidates, ScheduledSeq, TokenDelta

Outputs = list[tuple[bytes, TokenDelta]]

BEAM_COUNTERS = ("beam_requests_finished", "beam_steps", "beam_forks", "beams_dropped", "beams_parked",
                 "beam_kv_blocks_shared", "beam_kv_blocks_unshared")


def new_group(request: Request, max_model_len: int) -> BeamGroup:
    """The search state of an admitted beam-search `request` (its max_tokens resolved)."""
    p = request.params
    return BeamGroup(width=p.beam_width, num_returned=p.n, length_penalty=p.length_penalty,
                     early_stopping=p.early_stopping, stop_token_ids=request.stop_token_ids,
                     max_generated=min(request.max_tokens, max_model_len - request.prompt_len))


def mark_beam_row(work: ScheduledSeq, seq: Sequence) -> None:
    """Fill a beam's `ScheduledSeq`: how many candidates to return and, when the worker holds it,
    the tokens chosen for it since (a `NewSeq` carried them otherwise: the planner zeroed the count)."""
    work.num_candidates = seq.request.beam.num_candidates
    if seq.pending_tokens:
        work.append_token_ids = seq.token_ids[-seq.pending_tokens:]
        seq.pending_tokens = 0


class BeamSearch:
    """Owns the live beams of every beam-search request in flight (`_live`, by request id, best
    first, aligned with `BeamGroup.scores`) and the candidates reported and not yet used.

    `add_sequence(request, token_ids)` registers a new beam with the `RequestTable`; `finish(seq)`
    frees one (`RequestTable.finish`); `release(seq)` tells the worker to drop one."""

    def __init__(self, policy: BatchPolicy, block_manager: BlockManager, *, add_sequence: Callable,
                 finish: Callable[[Sequence], None], release: Callable[[Sequence], None],
                 clock: Callable[[], float]) -> None:
        self.policy = policy
        self.block_manager = block_manager
        self._add_sequence = add_sequence
        self._finish = finish
        self._release = release
        self._clock = clock
        self._live: dict[str, list[Sequence]] = {}
        self._candidates: dict[int, tuple[list[int], list[float]]] = {}  # seq id -> (token ids, logprobs)
        self._reported: dict[str, Request] = {}  # requests with a report since the last advance()
        self._queued_finished = False  # a beam finished while in the waiting queue
        self._forked_running = False  # a fork joined the running list (out of policy order) in this advance()
        self.counters = dict.fromkeys(BEAM_COUNTERS, 0)

    def report(self, seq: Sequence, candidates: BeamCandidates | None) -> None:
        """Beam `seq` computed its last token; `candidates` are its row's."""
        if candidates is None or not candidates.token_ids or len(candidates.token_ids) != len(candidates.logprobs):
            raise ValueError(f"beam {seq.seq_id} of request {seq.request_id} got no candidates from the worker")
        request = seq.request
        self._live.setdefault(request.request_id, [seq])
        self._candidates[seq.seq_id] = (candidates.token_ids, candidates.logprobs)
        self._reported[request.request_id] = request

    def advance(self) -> Outputs:
        """Select for every group whose live beams have all reported; returns the deltas of the
        groups that finished (their n hypotheses)."""
        outputs: Outputs = []
        reported, self._reported = self._reported, {}
        for request_id, request in reported.items():
            beams = self._live.get(request_id)
            if beams is None or request.is_finished() or any(b.seq_id not in self._candidates for b in beams):
                continue
            outputs.extend(self._select(request, beams))
        if self._forked_running:  # forks joined the running list at its end: one sort for all of them
            self._forked_running = False
            self.policy.running.sort(key=lambda s: s.sort_key)
        if self._queued_finished:  # a finished beam was in the waiting queue: O(queues), rare
            self._queued_finished = False
            self.policy.remove_finished()
        elif reported:
            self.policy.remove_finished_running()
        return outputs

    def park_stragglers(self) -> None:
        """Before a step: in a group with a beam out of the running set still to compute, park the
        beams that reported (they would hold blocks the missing one may need). Forgets the groups
        that ended (finished or aborted). O(live beams)."""
        for request_id, beams in list(self._live.items()):
            if beams[0].request.is_finished():
                for beam in beams:
                    self._candidates.pop(beam.seq_id, None)
                del self._live[request_id]
                continue
            if all(b.status is SeqStatus.RUNNING or b.status is SeqStatus.BEAM_PARKED for b in beams):
                continue
            for beam in beams:
                if beam.seq_id in self._candidates and beam.status in (SeqStatus.RUNNING, SeqStatus.WAITING):
                    self._park(beam)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    # -- internals -------------------------------------------------------------------

    def _park(self, beam: Sequence) -> None:
        if beam.status is SeqStatus.RUNNING:
            self.policy.running.remove(beam)
            self.block_manager.free(beam.seq_id)
            self._release(beam)
        else:
            self.policy.waiting.remove(beam)
        beam.num_computed_tokens = 0
        beam.status = SeqStatus.BEAM_PARKED
        self.counters["beams_parked"] += 1

    def _count_blocks(self, group: BeamGroup, beams: list[Sequence]) -> None:
        """This step's device blocks: shared ones once, against a full copy per beam."""
        bm, distinct, unshared = self.block_manager, set(), 0
        for beam in beams:
            needed = bm.blocks_needed(beam.num_tokens)
            unshared += needed
            if beam.status is SeqStatus.RUNNING:
                distinct.update(beam.block_table)
            else:
                distinct.update(("recompute", beam.seq_id, i) for i in range(needed))
        group.kv_blocks_shared += len(distinct)
        group.kv_blocks_unshared += unshared
        self.counters["beam_kv_blocks_shared"] += len(distinct)
        self.counters["beam_kv_blocks_unshared"] += unshared

    def _select(self, request: Request, beams: list[Sequence]) -> Outputs:
        group: BeamGroup = request.beam
        self._count_blocks(group, beams)
        self.counters["beam_steps"] += 1
        prompt_len = request.prompt_len
        selection = group.select([self._candidates.pop(b.seq_id) for b in beams],
                                 [b.token_ids[prompt_len:] for b in beams])
        if selection.done:
            return self._complete(request, beams)
        continuing: dict[int, int] = {}  # parent index -> token
        next_beams: list[Sequence] = []
        for parent_index, token, _ in selection.beams:
            parent = beams[parent_index]
            if parent_index not in continuing:
                continuing[parent_index] = token
                next_beams.append(parent)
            else:
                next_beams.append(self._fork(parent, token))
        for parent_index, token in continuing.items():
            parent = beams[parent_index]
            parent.token_ids.append(token)
            if parent.status is SeqStatus.BEAM_PARKED:
                parent.status = SeqStatus.WAITING
                self.policy.enqueue(parent)
            elif parent.on_worker:
                parent.pending_tokens += 1
        for i, beam in enumerate(beams):
            if i not in continuing:
                self._drop(beam)
        request.seqs = [s for s in request.seqs if s.status is not SeqStatus.FINISHED]
        self._live[request.request_id] = next_beams
        return []

    def _fork(self, parent: Sequence, token: int) -> Sequence:
        """A new beam: `parent`'s tokens and `token`; shares `parent`'s blocks when it has them."""
        child = self._add_sequence(parent.request, parent.token_ids + [token])
        base = parent.request.seqs[0].sort_key[:3]
        child.sort_key = (*base, child.seq_id)  # next to its group in policy order, after its first beam
        self.counters["beam_forks"] += 1
        if parent.status is SeqStatus.RUNNING:
            child.block_table = self.block_manager.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SeqStatus.RUNNING
            self.policy.running.append(child)
            self._forked_running = True
        else:
            self.policy.enqueue(child)  # recomputed: its parent holds no blocks to share
        return child

    def _drop(self, beam: Sequence) -> None:
        self.counters["beams_dropped"] += 1
        self._free(beam)

    def _free(self, beam: Sequence) -> None:
        self._queued_finished |= beam.status is SeqStatus.WAITING
        self._finish(beam)

    def _complete(self, request: Request, beams: list[Sequence]) -> Outputs:
        """The search ended: n deltas, best first; every live beam is freed."""
        group: BeamGroup = request.beam
        results = list(group.results())
        prompt_len = request.prompt_len
        for beam, score in zip(beams, group.scores):  # fewer hypotheses than n: the best live beams fill in
            if len(results) >= group.num_returned:
                break
            generated = beam.token_ids[prompt_len:]
            results.append(Hypothesis(generated, score, score / max(1, len(generated)) ** group.length_penalty,
                                      "length"))
        preemptions = sum(b.num_preemptions for b in beams)
        for beam in beams:
            self._free(beam)
        del self._live[request.request_id]
        self.counters["beam_requests_finished"] += 1
        outputs = []
        for index, hyp in enumerate(results):
            delta = TokenDelta(request.request_id, index, hyp.token_ids, hyp.finish_reason, preemptions,
                               cumulative_logprob=hyp.cumulative_logprob, beam_score=hyp.score)
            outputs.append((request.frontend, delta))
        if outputs:
            outputs[0][1].beam_stats = {"beam_kv_blocks_shared": group.kv_blocks_shared,
                                        "beam_kv_blocks_unshared": group.kv_blocks_unshared}
            if request.first_token_at is None:
                time_first_token(request, outputs[0][1], self._clock())
        return outputs
