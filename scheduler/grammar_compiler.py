"""Grammars for structured output, compiled by llguidance off the scheduler's loop thread.

Why llguidance (not xgrammar, not our own): it is torch-free (the scheduler never imports
torch), one abi3 wheel with no dependencies, reads the Hugging Face tokenizer JSON itself
(so the scheduler needs neither transformers nor a byte table of our making), compiles a
typical schema in about a millisecond and computes masks lazily in microseconds, releases
the GIL while it works, and accepts JSON Schema, regex, Lark and GBNF.

The tokenizer arrives once from a frontend (`TokenizerInfo`); it and every grammar are
built on a small thread pool. A finished build wakes the loop through `wake` (thread-safe).
Compiled grammars are cached by their text (`StructuredOutputs.cache_key`), errors too, so a
client repeating a bad schema costs nothing; a failure to get a tokenizer is not cached.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance

from shared.logging import get_logger
from shared.structured import StructuredOutputs

log = get_logger("scheduler")

COMPILE_THREADS = 2  # one can build the tokenizer while another compiles
CACHE_SIZE = 256  # grammars kept, least recently used dropped first
TOKENIZER_WAIT_S = 30.0  # a grammar waits this long for a tokenizer before it fails


class GrammarError(ValueError):
    """The grammar does not compile, or the engine does not support it: the client's error."""


class NoTokenizer(GrammarError):
    """No usable tokenizer yet: not cached, a later request may succeed."""


class CompiledGrammar:
    """A compiled grammar in its start state; `matcher(tokens)` gives each sequence its own."""

    def __init__(self, template: llguidance.LLMatcher, kind: str) -> None:
        self._template = template
        self.kind = kind

    def matcher(self, generated: list[int]) -> llguidance.LLMatcher:
        """A matcher that has accepted `generated` (a resubmitted output's tokens so far)."""
        matcher = self._template.deep_copy()
        for token in generated:
            if not matcher.consume_token(token):
                raise GrammarError(f"the tokens already generated do not match the grammar: "
                                   f"{brief(matcher.get_error())}")
        return matcher


class GrammarCompiler:
    """Owns the llguidance tokenizer (None until a frontend sends one), the thread pool and the
    cache. `vocab_size` is the model's (its logits' width), `eos_token_ids` end a grammar."""

    def __init__(self, *, vocab_size: int, eos_token_ids: list[int], wake: Callable[[], None]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._wake = wake
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error = ""
        self._tokenizer_done = threading.Event()
        self._tokenizer_received = False
        self._cache: collections.OrderedDict[str, Future] = collections.OrderedDict()
        self.counters = {"structured_compiles": 0, "structured_compile_s": 0.0}  # totals since start
        self._counters_lock = threading.Lock()

    @property
    def needs_tokenizer(self) -> bool:
        return not self._tokenizer_received

    def set_tokenizer(self, tokenizer_json: str) -> None:
        """The first frontend's tokenizer; later ones are ignored (every frontend serves one model)."""
        if self._tokenizer_received:
            return
        self._tokenizer_received = True
        self._pool.submit(self._build_tokenizer, tokenizer_json)

    def compile(self, spec: StructuredOutputs) -> Future:
        """A future of the `CompiledGrammar` (or its `GrammarError`); `wake` is called when it is done."""
        key = spec.cache_key()
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._compile, spec)
        future.add_done_callback(lambda f: self._wake())
        self._cache[key] = future
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return future

    def forget(self, spec: StructuredOutputs) -> None:
        """Drop an entry that failed with `NoTokenizer`: a later try may pass."""
        self._cache.pop(spec.cache_key(), None)

    def close(self) -> None:
        self._tokenizer_done.set()  # a grammar waiting for a tokenizer fails now, not in TOKENIZER_WAIT_S
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- on the pool's threads --------------------------------------------------------------
    def _build_tokenizer(self, tokenizer_json: str) -> None:
        started = time.perf_counter()
        try:
            if not tokenizer_json:
                raise ValueError("the frontend's tokenizer is not a fast (Rust) tokenizer")
            self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_ids)
            log.info("structured.tokenizer_ready", vocab_size=self._tokenizer.vocab_size,
                     build_s=round(time.perf_counter() - started, 4))
        except Exception as e:  # a tokenizer llguidance cannot read: structured requests fail, others run
            self._tokenizer_error = f"the model's tokenizer cannot be used for structured output: {e}"
            log.error("structured.tokenizer_failed", error=str(e))
        finally:
            self._tokenizer_done.set()

    def _compile(self, spec: StructuredOutputs) -> CompiledGrammar:
        if not self._tokenizer_done.wait(TOKENIZER_WAIT_S):
            raise NoTokenizer(f"no tokenizer reached the scheduler within {TOKENIZER_WAIT_S:.0f} s")
        if self._tokenizer is None:
            raise NoTokenizer(self._tokenizer_error)
        started = time.perf_counter()
        grammar = llguidance_grammar(spec)
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise GrammarError(f"{spec.kind()}: {brief(error)}")
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"{spec.kind()}: {brief(template.get_error())}")
        compile_s = time.perf_counter() - started
        with self._counters_lock:  # two pool threads may finish together
            self.counters["structured_compiles"] += 1
            self.counters["structured_compile_s"] += compile_s
        log.info("structured.compiled", kind=spec.kind(), grammar_chars=len(spec.text()),
                 compile_s=round(compile_s, 6))
        return CompiledGrammar(template, spec.kind())


def llguidance_grammar(spec: StructuredOutputs) -> str:
    """`spec` as llguidance's grammar text. Raises GrammarError for text it cannot even read."""
    kind = spec.kind()
    try:
        if kind in ("json", "json_object"):
            if spec.whitespace_pattern is None:
                options = {"whitespace_flexible": False}
            else:
                options = {"whitespace_pattern": spec.whitespace_pattern}
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text(), defaults=options)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", spec.choice)
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise GrammarError(f"{kind}: {e}") from None


def brief(error: str) -> str:
    """llguidance's message without the parser state dump it appends."""
    return error.split("\n<state>")[0].strip()
