"""The worker's side of structured output: mask rows land on the right logit rows, allowed
tokens keep their logits, every other token (and ids past the mask's words) get -inf."""

from __future__ import annotations

import struct

import torch

from worker.grammar_mask import apply_grammar_masks


def _mask_row(allowed: set[int], vocab: int) -> bytes:
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return struct.pack(f"<{len(words)}I", *words)


def test_masks_apply_to_their_rows_only():
    vocab = 70  # not a multiple of 32: the last word's spare bits are ignored
    logits = torch.randn(4, vocab)
    before = logits.clone()
    allowed = [{0, 31, 32, 69}, {5}]
    apply_grammar_masks(logits, _mask_row(allowed[0], vocab) + _mask_row(allowed[1], vocab), [3, 1])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    for row, tokens in ((3, allowed[0]), (1, allowed[1])):
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == tokens
        assert all(logits[row, t] == before[row, t] for t in tokens)
    assert int(logits[1].argmax()) == 5


def test_no_rows_is_a_no_op():
    logits = torch.randn(2, 8)
    before = logits.clone()
    apply_grammar_masks(logits, b"", [])
    assert torch.equal(logits, before)
