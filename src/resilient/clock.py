"""Clocks: where every time-dependent block of `resilient` reads the time.

Each block takes an optional ``clock``; the default is the system clock. Tests pass
:class:`resilient.testing.FakeClock` instead and move time forward by hand, so nothing
in the test suite has to sleep.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time.

    ``monotonic()`` measures durations (it never goes backwards); ``time()`` is the wall
    clock in seconds since the Unix epoch, the one to share with other processes.
    """

    def monotonic(self) -> float:
        """Return seconds from an arbitrary origin, never decreasing."""
        ...

    def time(self) -> float:
        """Return seconds since the Unix epoch."""
        ...


class SystemClock:
    """The operating system's clocks (:func:`time.monotonic` and :func:`time.time`)."""

    __slots__ = ()

    def monotonic(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()

    def time(self) -> float:
        """Return :func:`time.time`."""
        return time.time()

    def __repr__(self) -> str:
        return "SystemClock()"
