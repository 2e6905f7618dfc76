"""Structured output in the scheduler: one object the `Scheduler` holds, composed of the
grammar compiler (scheduler/grammar_compiler.py), the requests waiting for their grammar
(scheduler/grammar_intake.py) and the step masks (scheduler/grammar_masks.py)."""

from __future__ import annotations

from collections.abc import Callable

from scheduler.grammar_compiler import GrammarCompiler
from scheduler.grammar_intake import Admit, GrammarIntake, Rejections
from scheduler.grammar_masks import MaskFiller
from scheduler.sequence import Sequence
from shared.protocol import AddRequest, RequestRejected, StepMasks, StepPlan


class StructuredOutput:
    """Owns the compiler, the intake and (from the first constrained step) the mask filler.
    `admit` queues a request with its grammar (RequestTable.add); `wake` is called from the
    compiler's threads when a grammar is done (the loop then calls `admit_ready`)."""

    def __init__(self, *, vocab_size: int, eos_token_ids: list[int], admit: Admit,
                 wake: Callable[[], None]) -> None:
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(vocab_size=vocab_size, eos_token_ids=eos_token_ids, wake=wake)
        self.intake = GrammarIntake(self.compiler, admit)
        self._filler: MaskFiller | None = None  # its threads start with the first masks

    @property
    def needs_tokenizer(self) -> bool:
        return self.compiler.needs_tokenizer

    def set_tokenizer(self, tokenizer_json: str) -> None:
        self.compiler.set_tokenizer(tokenizer_json)

    def add(self, msg: AddRequest, frontend: bytes) -> RequestRejected | None:
        return self.intake.add(msg, frontend)

    def admit_ready(self) -> Rejections:
        return self.intake.admit_ready()

    def masks(self, plan: StepPlan, seqs: list[Sequence]) -> StepMasks:
        if self._filler is None:
            self._filler = MaskFiller(self.vocab_size)
        return self._filler.masks(plan, seqs)

    def stats(self) -> dict:
        """Totals since start (docs/events.md, scheduler.stats) and requests awaiting a grammar now."""
        filler = self._filler.counters if self._filler else MaskFiller.zero_counters()
        compiler = self.compiler.counters
        return {"structured_awaiting_grammar": len(self.intake), **self.intake.counters,
                "structured_compiles": compiler["structured_compiles"],
                "structured_compile_s": round(compiler["structured_compile_s"], 6),
                **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in filler.items()}}

    def close(self) -> None:
        self.compiler.close()
