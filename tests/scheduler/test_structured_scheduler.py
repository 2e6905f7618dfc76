"""Structured output in the scheduler, with a toy tokenizer and a fake worker that honours the
masks: requests wait for their grammar without blocks, bad grammars are rejected alone, masks
cover exactly the rows that sample, matchers follow every token (n > 1, preemption by recompute
and swap, resubmission), and a complete grammar finishes its sequence with "stop"."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
from grammar_toy import VOCAB, MaskedWorker, decode, grammar_scheduler
from sched_harness import add

from scheduler import grammar_compiler
from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import AddRequest, SamplingParams
from shared.structured import StructuredOutputs

PROMPT = [8, 9, 10, 11, 12, 13]
OBJECT_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                                  "b": {"enum": ["ab", "cd"]}},
                 "required": ["a", "b"], "additionalProperties": False}


def constrained(rid: str, prompt=PROMPT, **params) -> AddRequest:
    return add(rid, prompt, **params)


class Driver:
    def __init__(self, **settings) -> None:
        self.sched, self.woken = grammar_scheduler(**settings)
        self.worker = MaskedWorker()
        self.outputs: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.finish: dict[tuple[str, int], str] = {}
        self.rejections = []

    def add(self, msg: AddRequest) -> None:
        rejected = self.sched.add_request(msg, b"fe")
        if rejected is not None:
            self.rejections.append(rejected)

    def wait_compiled(self) -> None:
        while self.sched.awaiting_grammar():
            assert self.woken.wait(10), "a grammar never finished compiling"
            self.woken.clear()
            self.rejections += [r for _, r in self.sched.admit_compiled()]

    def record(self, outputs) -> None:
        for _, delta in outputs:
            self.outputs[(delta.request_id, delta.index)] += delta.token_ids
            if delta.finish_reason:
                self.finish[(delta.request_id, delta.index)] = delta.finish_reason

    def step(self):
        plan = self.sched.schedule()
        masks = self.sched.step_masks(plan)
        self.worker.apply(plan)
        self.record(self.sched.update(self.worker.run_masked(plan, masks)))
        self.sched.check_invariants()
        return plan

    def run(self, max_steps: int = 5000) -> None:
        self.wait_compiled()
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step()
        raise AssertionError("no progress")

    def text(self, rid: str, index: int = 0) -> str:
        return decode(self.outputs[(rid, index)])


def test_outputs_follow_json_schema_regex_and_choice():
    d = Driver()
    d.add(constrained("json", max_tokens=60, seed=1, structured_outputs=StructuredOutputs(json=OBJECT_SCHEMA)))
    d.add(constrained("regex", max_tokens=60, seed=2,
                      structured_outputs=StructuredOutputs(regex=r"[a-f]{2,5}-[0-9]{3}")))
    d.add(constrained("choice", max_tokens=60, seed=3,
                      structured_outputs=StructuredOutputs(choice=["abc", "xyz", "q"])))
    d.add(add("free", PROMPT, max_tokens=12, ignore_eos=True, seed=4))
    d.run()
    value = json.loads(d.text("json"))
    assert set(value) == {"a", "b"} and 0 <= value["a"] <= 999 and value["b"] in ("ab", "cd")
    assert re.fullmatch(r"[a-f]{2,5}-[0-9]{3}", d.text("regex"))
    assert d.text("choice") in ("abc", "xyz", "q")
    assert all(d.finish[(rid, 0)] == "stop" for rid in ("json", "regex", "choice"))
    assert d.finish[("free", 0)] == "length" and len(d.outputs[("free", 0)]) == 12
    stats = d.sched.stats()
    assert stats["structured_requests"] == 3 and stats["structured_compiles"] == 3
    assert stats["structured_masks"] == sum(len(d.outputs[(r, 0)]) for r in ("json", "regex", "choice"))


def test_a_request_waits_for_its_grammar_without_blocks_and_a_bad_one_is_rejected_alone():
    d = Driver()
    d.add(constrained("bad", structured_outputs=StructuredOutputs(regex="[a-")))
    d.add(constrained("good", max_tokens=20, structured_outputs=StructuredOutputs(choice=["abc"])))
    d.add(add("free", PROMPT, max_tokens=5, ignore_eos=True))
    stats = d.sched.stats()
    # "bad" may be rejected already: grammars compile in a thread, and a broken one fails fast.
    assert stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] in (2, 3)
    d.run()
    assert [(r.request_id, r.code) for r in d.rejections] == [("bad", "invalid_request")]
    assert "regex" in d.rejections[0].message and "[a-" in d.rejections[0].message
    assert d.text("good") == "abc" and len(d.outputs[("free", 0)]) == 5
    # The same bad grammar again costs no compile: its error is cached.
    compiles = d.sched.stats()["structured_compiles"]
    d.add(constrained("bad2", structured_outputs=StructuredOutputs(regex="[a-")))
    d.wait_compiled()
    assert d.rejections[-1].request_id == "bad2" and d.sched.stats()["structured_compiles"] == compiles


def test_masks_cover_exactly_the_rows_that_sample_under_chunked_prefill():
    d = Driver(max_num_batched_tokens=16)
    long_prompt = [8 + i % 30 for i in range(40)]
    d.add(constrained("long", long_prompt, max_tokens=30, structured_outputs=StructuredOutputs(regex="[0-9]{4}")))
    d.wait_compiled()
    plans = []
    while d.sched.has_work():
        plans.append(d.step())
    # Three partial chunks (16 + 16 + 8 tokens: the last samples), then one token per step.
    assert [p.masked_rows for p in plans[:3]] == [[], [], [0]]
    assert all(p.masked_rows == [0] for p in plans[2:])
    assert re.fullmatch("[0-9]{4}", d.text("long")) and d.finish[("long", 0)] == "stop"


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_n4_under_preemption_every_output_matches(mode):
    # 24 blocks of 4 tokens: eight requests of four outputs cannot all run at once.
    d = Driver(num_blocks=24, num_host_blocks=64 if mode == "swap" else 0, preemption_mode=mode)
    for i in range(8):
        d.add(constrained(f"r{i}", [8 + i, 9, 10, 11, 12], n=4, max_tokens=40, seed=i,
                          structured_outputs=StructuredOutputs(json=OBJECT_SCHEMA)))
    d.run()
    assert d.sched.stats()[f"preemptions_{mode}"] > 0
    for i in range(8):
        for k in range(4):
            value = json.loads(d.text(f"r{i}", k))
            assert 0 <= value["a"] <= 999 and value["b"] in ("ab", "cd")


def test_unconstrained_tokens_are_the_same_with_or_without_constrained_neighbours():
    def free_outputs(with_constrained: bool):
        d = Driver()
        for i in range(4):
            d.add(add(f"free{i}", [8 + i, 20, 21], max_tokens=25, ignore_eos=True, seed=i))
            if with_constrained:
                d.add(constrained(f"c{i}", max_tokens=25, seed=i,
                                  structured_outputs=StructuredOutputs(regex="[a-z]{5}")))
        d.run()
        return {k: v for k, v in d.outputs.items() if k[0].startswith("free")}

    assert free_outputs(True) == free_outputs(False)


def test_a_resubmission_continues_its_grammar_and_a_mismatch_is_rejected():
    d = Driver()
    so = StructuredOutputs(regex="abc[0-9]{3}")
    d.add(AddRequest("resumed", PROMPT, SamplingParams(max_tokens=20, structured_outputs=so), 0.0,
                     output_token_ids=[[46, 22]]))  # "ab" "c": already streamed before a scheduler restart
    d.add(AddRequest("wrong", PROMPT, SamplingParams(max_tokens=20, structured_outputs=so), 0.0,
                     output_token_ids=[[8]]))  # "0" cannot start this grammar
    d.run()
    assert re.fullmatch("[0-9]{3}", d.text("resumed")) and d.finish[("resumed", 0)] == "stop"
    assert [(r.request_id, r.code) for r in d.rejections] == [("wrong", "invalid_request")]


def test_abort_while_waiting_for_the_grammar_and_no_tokenizer(monkeypatch):
    monkeypatch.setattr(grammar_compiler, "TOKENIZER_WAIT_S", 0.2)
    sched, woken = grammar_scheduler()
    so = StructuredOutputs(regex="[0-9]+")
    # Aborted before its grammar is ready: finishing deltas for each output, and it never runs.
    sched.add_request(constrained("gone", n=2, structured_outputs=StructuredOutputs(regex="[0-9]{1000}")), b"fe")
    outputs = sched.abort(["gone"])
    assert sorted((d.request_id, d.index, d.finish_reason) for _, d in outputs) == [("gone", 0, "abort"),
                                                                                     ("gone", 1, "abort")]
    woken.wait(10)
    assert sched.admit_compiled() == [] and not sched.has_work()
    # A scheduler that never got a tokenizer rejects structured requests once the wait is over.
    bare = Scheduler(ServerConfig().scheduler, num_device_blocks=100, block_size=4, max_model_len=256,
                     vocab_size=VOCAB, eos_token_ids=[0], wake=woken.set)
    woken.clear()
    assert bare.add_request(constrained("x", structured_outputs=so), b"fe") is None
    assert woken.wait(10)
    (frontend, rejected), = bare.admit_compiled()
    assert rejected.code == "invalid_request" and "no tokenizer" in rejected.message
    bare.structured.close()
