"""Incremental detokenization and stop strings for one output of one request.

Why a window and not `decode(all ids)` each time: that is quadratic in the output
length. Why not `decode(new ids)`: byte-level BPE splits multi-byte characters
across tokens, and SentencePiece drops a leading space at the start of a decode.
So we decode a short window twice, `ids[prefix:read]` and `ids[prefix:]`; both
start on the same token, so those artefacts cancel, and the difference is the new
text. A trailing U+FFFD means an incomplete character: wait for the next token.
"""

from __future__ import annotations

from typing import Callable

# How many prompt tokens seed the window, so the first output token decodes with context.
INITIAL_WINDOW_TOKENS = 5


class OutputText:
    """Text of one output: appends token ids, yields releasable text, finds stop strings.

    With stop strings, the last `len(longest stop) - 1` characters are held back
    from streaming until the output finishes, so a stop string is never streamed.
    Stop strings are looked for only once `min_tokens` tokens are generated (as vLLM).
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool = False, min_tokens: int = 0):
        self._decode = decode
        tail = prompt_ids[-INITIAL_WINDOW_TOKENS:]
        self._ids: list[int] = list(tail)  # window ids: a prompt tail, then every output id
        self._prefix = 0
        self._read = len(tail)
        self.token_ids: list[int] = []  # generated ids only
        self.text = ""  # all text so far, stop string removed once matched
        self.sent = 0  # characters of `text` already released
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self.stopped = False  # a stop string matched

    def append(self, new_ids: list[int]) -> int:
        """Add generated ids; update `text`; set `stopped` on a stop-string match. Returns how
        many of `new_ids` were taken.

        Ids are taken one at a time, and stop strings are checked after each: a delta may carry
        several tokens (speculative decoding accepts a run of them), and the tokens after the one
        that completes a stop string are dropped, as if generation had ended there."""
        taken = 0
        for tid in new_ids:
            if self.stopped:
                break
            taken += 1
            self.token_ids.append(tid)
            checked_upto = len(self.text)
            self._ids.append(tid)
            prefix_text = self._decode(self._ids[self._prefix:self._read])
            full_text = self._decode(self._ids[self._prefix:])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                self.text += full_text[len(prefix_text):]
                self._prefix, self._read = self._read, len(self._ids)
            if self._stop and len(self.text) > checked_upto and len(self.token_ids) >= self._min_tokens:
                self._find_stop(checked_upto)
        return taken

    def _find_stop(self, checked_upto: int) -> None:
        # A stop string may start up to len(stop)-1 characters before the new text.
        start = max(0, checked_upto - self._hold)
        best = None
        for s in self._stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[: i + len(s)] if self._include_stop else self.text[:i]
            self.stopped = True

    def release(self, finished: bool) -> str:
        """Text not yet released; holds back a possible stop-string prefix unless finished."""
        end = len(self.text) if (finished or self.stopped) else max(self.sent, len(self.text) - self._hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out
