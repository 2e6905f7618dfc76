"""A fake worker and a driver for Scheduler tests: no sockets, no torch.

The fake worker rebuilds every sequence from the plan's diffs alone and
simulates the KV cache: computing token p writes it into slot p of the
sequence's block table, and sampling reads the whole history back through the
table. A block given to two sequences, a missing block or a stale table shows
up as a corrupted history, not just as a bookkeeping mismatch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import AddRequest, SamplingParams, StepPlan, StepResult, TokenDelta

VOCAB = 64
EOS = 0


def toy_sample(history: list[int], output_index: int, seed: int) -> int:
    """A deterministic stand-in for a model: the next token from the recent
    tokens, the position, the output index and the seed (EOS about 1 in 64)."""
    x = len(history) * 2654435761 + sum(t * (i + 3) for i, t in enumerate(history[-3:])) * 40503
    x += output_index * 97 + seed * 131
    return (x ^ (x >> 13)) % VOCAB


def reference_output(prompt, params: SamplingParams, index: int, *, max_model_len: int, sample=toy_sample,
                     eos=(EOS,)) -> tuple[list[int], str]:
    """What one output must be, computed without any scheduler."""
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - len(prompt)
    stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
    history, out = list(prompt), []
    while True:
        token = sample(history, index, params.seed or 0)
        history.append(token)
        out.append(token)
        if token in stop:
            return out, "stop"
        if len(out) >= max_tokens or len(history) >= max_model_len:
            return out, "length"


@dataclass
class WorkerSeq:
    token_ids: list[int]
    block_ids: list[int]
    output_index: int
    seed: int
    num_computed: int | None = None  # None: registered this step, trusts the plan


class FakeWorker:
    """Simulates the device KV cache (block -> token per slot) and the host
    swap space, applying swaps and copies in the real worker's order."""

    def __init__(self, block_size: int, sample=toy_sample):
        self.block_size = block_size
        self.sample = sample
        self.kv: dict[int, list[int | None]] = defaultdict(lambda: [None] * block_size)
        self.host: dict[int, list[int | None]] = {}
        self.seqs: dict[int, WorkerSeq] = {}

    def apply(self, plan: StepPlan) -> None:
        """Drop, swap out, swap in, copy, register, append blocks; check the diffs make sense."""
        for seq_id in plan.finished_seq_ids:
            assert seq_id in self.seqs, f"drop of unknown sequence {seq_id}"
            del self.seqs[seq_id]
        for pairs in (plan.swap_out, plan.swap_in, plan.copy):
            assert len({dst for _, dst in pairs}) == len(pairs), "two copies into one block"
        for device, host in plan.swap_out:
            self.host[host] = list(self.kv[device])
        for host, device in plan.swap_in:
            self.kv[device] = list(self.host[host])
        sources = {src: list(self.kv[src]) for src, _ in plan.copy}  # all read before any is written
        for src, dst in plan.copy:
            self.kv[dst] = list(sources[src])
        scheduled_ids = [w.seq_id for w in plan.scheduled]
        assert len(set(scheduled_ids)) == len(scheduled_ids), "a sequence scheduled twice in one step"
        new_ids = set()
        for new in plan.new_seqs:
            assert new.prompt_len <= len(new.token_ids)
            # A known id is replaced, as the real worker's InputBatch.add does.
            self.seqs[new.seq_id] = WorkerSeq(list(new.token_ids), list(new.block_ids), new.output_index,
                                              new.params.seed or 0)
            new_ids.add(new.seq_id)
        assert new_ids <= set(scheduled_ids), "a NewSeq that is not scheduled"
        for work in plan.scheduled:
            seq = self.seqs[work.seq_id]
            if work.seq_id in new_ids:
                assert not work.new_block_ids
            else:
                assert work.num_computed_tokens == seq.num_computed, "scheduler and worker disagree on progress"
            seq.block_ids.extend(work.new_block_ids)
            end = work.num_computed_tokens + work.num_tokens
            assert work.num_tokens >= 1 and end <= len(seq.token_ids)
            assert len(seq.block_ids) == -(-end // self.block_size), "block table does not cover the chunk"

    def run(self, plan: StepPlan) -> StepResult:
        """Write every chunk's KV, then sample each sequence whose chunk ended."""
        bs = self.block_size
        holders = defaultdict(int)
        for seq in self.seqs.values():
            for b in seq.block_ids:
                holders[b] += 1
        for work in plan.scheduled:
            seq = self.seqs[work.seq_id]
            for pos in range(work.num_computed_tokens, work.num_computed_tokens + work.num_tokens):
                block = seq.block_ids[pos // bs]
                assert holders[block] == 1, f"sequence {work.seq_id} writes into block {block}, which is shared"
                self.kv[block][pos % bs] = seq.token_ids[pos]
        sampled = []
        for work in plan.scheduled:
            seq = self.seqs[work.seq_id]
            seq.num_computed = work.num_computed_tokens + work.num_tokens
            if seq.num_computed < len(seq.token_ids):
                sampled.append(-1)
                continue
            history = [self.kv[seq.block_ids[pos // bs]][pos % bs] for pos in range(seq.num_computed)]
            assert history == seq.token_ids, f"sequence {work.seq_id} reads corrupted KV"
            token = self.sample(history, seq.output_index, seq.seed)
            seq.token_ids.append(token)
            sampled.append(token)
        return StepResult(plan.step_id, sampled)


def make_scheduler(*, num_blocks=1000, block_size=4, max_model_len=256, max_num_seqs=128,
                   max_num_batched_tokens=None, vocab_size=VOCAB, eos=(EOS,), num_host_blocks=0,
                   enable_chunked_prefill=True, enable_prefix_caching=True,
                   preemption_mode="recompute") -> Scheduler:
    config = ServerConfig.from_settings(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                        enable_chunked_prefill=enable_chunked_prefill,
                                        enable_prefix_caching=enable_prefix_caching,
                                        preemption_mode=preemption_mode)
    return Scheduler(config.scheduler, num_device_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                     vocab_size=vocab_size, eos_token_ids=list(eos), num_host_blocks=num_host_blocks)


def add(rid: str, prompt, *, priority=0, arrival=0.0, **params) -> AddRequest:
    return AddRequest(rid, list(prompt), SamplingParams(**params), arrival, priority)


class Harness:
    """Drives a Scheduler with a FakeWorker, checking both views every step."""

    def __init__(self, scheduler: Scheduler, sample=toy_sample):
        self.scheduler = scheduler
        self.worker = FakeWorker(scheduler.block_manager.block_size, sample)
        self.outputs: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.finished: dict[tuple[str, int], TokenDelta] = {}  # the finishing delta
        self.plans: list[StepPlan] = []

    def add(self, msg: AddRequest, frontend: bytes = b"fe") -> None:
        assert self.scheduler.add_request(msg, frontend) is None

    def record(self, outputs: list[tuple[bytes, TokenDelta]]) -> None:
        for _frontend, delta in outputs:
            key = (delta.request_id, delta.index)
            assert key not in self.finished, f"{key} got a delta after finishing"
            self.outputs[key].extend(delta.token_ids)
            if delta.finish_reason is not None:
                self.finished[key] = delta

    def step(self) -> StepPlan:
        sched = self.scheduler
        assert sched.has_work()
        plan = sched.schedule()
        assert plan.scheduled, "a step with work queued scheduled nothing"
        self.plans.append(plan)
        self.worker.apply(plan)
        assert self.worker.seqs.keys() == {s.seq_id for s in sched.policy.running if s.on_worker}
        for work in plan.scheduled:
            seq, mirror = sched.get_sequence(work.seq_id), self.worker.seqs[work.seq_id]
            assert seq.block_table == mirror.block_ids and seq.token_ids == mirror.token_ids
        self.record(sched.update(self.worker.run(plan)))
        sched.check_invariants()
        return plan

    def run(self, arrivals: dict[int, list[AddRequest]] | None = None, max_steps: int = 20_000) -> int:
        """Step until idle, adding arrivals[k] before step k; returns the steps taken."""
        arrivals = dict(arrivals or {})
        steps = 0
        while arrivals or self.scheduler.has_work():
            for msg in arrivals.pop(steps, []):
                self.add(msg)
            if self.scheduler.has_work():
                self.step()
            steps += 1
            assert steps < max_steps, "no progress"
        return steps
