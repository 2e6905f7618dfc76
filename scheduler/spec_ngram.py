"""N-gram prompt lookup: propose the tokens that followed the most recent earlier occurrence of a
sequence's last n tokens (n from `lookup_max` down to `lookup_min`) in its own prompt and output.
Pure function of the token list: no state to lose on recompute or restart."""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(token_ids: Sequence[int], num_tokens: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Up to `num_tokens` proposed tokens ([] when no n-gram matches). The longest n wins; among its
    matches the most recent one (recent text predicts the next best). O(len(token_ids) * n)."""
    length = len(token_ids)
    if num_tokens <= 0 or length < lookup_min + 1:
        return []
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        suffix = list(token_ids[length - n:])
        first = suffix[0]
        # A match starting at `start` must end before the suffix itself: start + n <= length - 1.
        for start in range(length - n - 1, -1, -1):
            if token_ids[start] == first and list(token_ids[start:start + n]) == suffix:
                follow = start + n
                return list(token_ids[follow:follow + num_tokens])
    return []
