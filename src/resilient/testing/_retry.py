"""A switch that turns retry waits off, for test suites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from resilient.retries.core import waits

__all__ = ["retries_without_waits", "set_retry_waits"]


def set_retry_waits(enabled: bool) -> None:
    """Turn the waits between retries on or off, for every :func:`~resilient.retry`.

    With waits off, retries still happen and decide exactly as before (attempts,
    deadlines, ``Retry-After``, budgets), but nothing sleeps: call
    ``set_retry_waits(False)`` once in a ``conftest.py`` and a test of a failing
    dependency runs in microseconds. Prefer :func:`retries_without_waits` for one test.
    """
    waits.enabled = enabled


@contextlib.contextmanager
def retries_without_waits() -> Iterator[None]:
    """Within the ``with`` block, retries do not wait; the previous setting comes back after.

    >>> from resilient import retry
    >>> from resilient.testing import retries_without_waits
    >>> calls = []
    >>> @retry(attempts=3, base=5.0)
    ... def flaky() -> str:
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionError("try again")
    ...     return "ok"
    >>> with retries_without_waits():
    ...     flaky()
    'ok'
    """
    previous = waits.enabled
    waits.enabled = False
    try:
        yield
    finally:
        waits.enabled = previous
