"""Wakes the scheduler's loop from another thread: a pipe whose read end the loop polls.

The grammar compiler's threads call `wake()` when a grammar is done; the loop's poller sees
the read end readable and calls `clear()`, then looks for what is ready. Writes never block
(a full pipe already means "wake up").
"""

from __future__ import annotations

import os


class Waker:
    """Owns both ends of a non-blocking pipe. `fd` is the end to poll."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)

    def wake(self) -> None:
        """Thread-safe."""
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending) or closed (stopping)
            pass

    def clear(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._write_fd)
        os.close(self.fd)
