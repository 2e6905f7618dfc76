"""One beam-search request's search state, and the step that picks its next beams.

Pure bookkeeping over candidate lists: no blocks, no queues (scheduler/beam_search.py applies a
`Selection` to sequences and block tables). The rules are transformers' `_beam_search`
(generation/utils.py, 5.x) for one batch item, so results match `generate(num_beams=width,
num_return_sequences=n, length_penalty=..., early_stopping=..., do_sample=False)`:

* scores are sums of log_softmax(raw logits) (natural log);
* each step keeps the top K = max(2, 1 + number of stop ids) * width continuations over every
  live beam; those ending in a stop id (or reaching the length limit) among the first `width`
  become hypotheses scored sum / generated_len ** length_penalty (generated_len counts the
  last token, EOS included); the best `width` of the others are the next beams;
* at most `width` hypotheses are kept, best first;
* the search ends when every continuation hits the length limit, when early_stopping is True
  and `width` hypotheses are kept, or when the best live beam cannot beat the worst kept
  hypothesis (its score at the current length; with early_stopping "never" and
  length_penalty > 0, at the longest length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# transformers' stand-in for minus infinity: a finished continuation is never a live beam.
_NEG = -1.0e9


@dataclass(slots=True)
class Hypothesis:
    """A finished beam: its generated tokens (the stop id included), sum of logprobs and score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop" (a stop id) or "length"


@dataclass(slots=True)
class Selection:
    """The next live beams, best first, as (index of the parent in the old beams, token, score)."""

    beams: list[tuple[int, int, float]]
    done: bool


@dataclass(slots=True)
class BeamGroup:
    """Search state of one request. Lengths in tokens. `scores[i]` is live beam i's sum of
    logprobs (beams themselves are held by scheduler/beam_search.py, in the same order);
    `generated` is how many tokens every live beam has generated (they advance together)."""

    width: int
    num_returned: int
    length_penalty: float
    early_stopping: bool | str
    stop_token_ids: frozenset[int]
    max_generated: int  # max_tokens, capped by max_model_len - prompt_len
    scores: list[float] = field(default_factory=lambda: [0.0])
    generated: int = 0
    hypotheses: list[Hypothesis] = field(default_factory=list)
    improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied
    # Summed over selection steps: device blocks the live beams held (shared ones once), and what
    # a full copy per beam would have held. Their ratio is what sharing saved.
    kv_blocks_shared: int = 0
    kv_blocks_unshared: int = 0

    @property
    def num_candidates(self) -> int:
        """K: candidates each live beam returns (the global top K is among their union)."""
        return max(2, 1 + len(self.stop_token_ids)) * self.width

    def select(self, candidates: list[tuple[list[int], list[float]]], history: list[list[int]]) -> Selection:
        """One step: `candidates[i]` are live beam i's best (token ids, logprobs), best first;
        `history[i]` its generated tokens so far (for hypotheses). Updates scores, hypotheses
        and the stop heuristic."""
        k, width, step_len = self.num_candidates, self.width, self.generated + 1
        pool = [(self.scores[i] + lp, i, token)
                for i, (ids, lps) in enumerate(candidates) for token, lp in zip(ids, lps)]
        pool.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then candidate order
        top = pool[:k]
        at_limit = step_len >= self.max_generated
        hits = [at_limit or token in self.stop_token_ids for _, _, token in top]
        # Hypotheses: only among the first `width`, only while they can still improve the kept ones.
        full = len(self.hypotheses) >= width
        if self.improvable and not (full and self.early_stopping is True):
            for (score, parent, token), hit in zip(top[:width], hits[:width]):
                if hit:
                    reason = "stop" if token in self.stop_token_ids else "length"
                    self.hypotheses.append(Hypothesis(history[parent] + [token], score,
                                                      score / step_len ** self.length_penalty, reason))
            self.hypotheses.sort(key=lambda h: -h.score)
            del self.hypotheses[width:]
        live = [(parent, token, score) for (score, parent, token), hit in zip(top, hits) if not hit][:width]
        self.generated = step_len
        self.scores = [score for _, _, score in live]
        if self.improvable:
            self.improvable = self._can_improve()
        done = (at_limit or not live or not self.improvable
                or (len(self.hypotheses) >= width and self.early_stopping is True))
        return Selection(live, done)

    def _can_improve(self) -> bool:
        """Could the best live beam still beat the worst kept hypothesis? (Always, until
        `width` are kept.)"""
        if len(self.hypotheses) < self.width or not self.scores:
            return bool(self.scores)
        length = self.generated
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_generated
        best_possible = self.scores[0] / length ** self.length_penalty
        return best_possible > self.hypotheses[-1].score

    def results(self) -> list[Hypothesis]:
        """The `num_returned` best hypotheses, best first."""
        return self.hypotheses[:self.num_returned]
