"""A clock that moves only when a test moves it."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`resilient.clock.Clock` whose time only changes through :meth:`advance`.

    Both readings move together: ``time()`` starts at *start* (seconds since the epoch)
    and ``monotonic()`` at zero. Thread-safe, so a test may advance it while other threads
    read it.

    >>> clock = FakeClock(start=1_000.0)
    >>> clock.advance(2.5)
    >>> clock.time(), clock.monotonic()
    (1002.5, 2.5)
    """

    __slots__ = ("_lock", "_offset", "_start")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._start = float(start)
        self._offset = 0.0
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        """Return the seconds advanced since this clock was made."""
        return self._offset

    def time(self) -> float:
        """Return the fake wall-clock time in seconds since the epoch."""
        return self._start + self._offset

    def advance(self, seconds: float) -> None:
        """Move time forward by *seconds* (which must not be negative)."""
        if seconds < 0:
            msg = f"a clock cannot go backwards (advance({seconds!r}))"
            raise ValueError(msg)
        with self._lock:
            self._offset += seconds

    async def sleep(self, seconds: float) -> None:
        """Advance the clock instead of sleeping: an injectable ``sleep`` for tests."""
        self.advance(max(seconds, 0.0))

    def __repr__(self) -> str:
        return f"FakeClock(time={self.time()!r})"
