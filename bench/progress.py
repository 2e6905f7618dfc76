"""A one-line progress bar on stderr for long benchmark phases (no dependency)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """`bar(done)` redraws `label [#####.....] done/total  elapsed` at most every 0.2 s."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream=sys.stderr):
        self.label, self.total, self.stream = label, max(1, total), stream
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self(0)

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self._drawn_at < 0.2:
            return
        self._drawn_at = now
        filled = self.WIDTH * min(done, self.total) // self.total
        line = (f"\r  {self.label:<34} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{done}/{self.total}  {now - self.started:6.1f}s")
        self.stream.write(line + ("\n" if done >= self.total else ""))
        self.stream.flush()
