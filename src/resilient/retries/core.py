"""The pure parts of retrying: backoff with jitter, and reading ``Retry-After``.

No I/O and no clock: every function takes the time and the random source it needs, so the
formulas can be checked exactly against a seeded :class:`random.Random`.

The jitter formulas are those of the AWS Architecture Blog ("Exponential Backoff And
Jitter"), for the *n*-th retry of a call (``n`` = 0 for the first retry)::

    full          uniform(0, min(cap, base * 2**n))
    equal         t / 2 + uniform(0, t / 2),  with t = min(cap, base * 2**n)
    decorrelated  uniform(base, min(cap, 3 * previous)),  previous starting at base

Decorrelated jitter draws its upper bound from the previous wait, but keeps drawing
uniformly once ``3 * previous`` passes the cap instead of pinning every later wait to the
cap (which would send all the clients that reached it back in lockstep).
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Mapping
from datetime import UTC
from typing import Final, Literal

from resilient.errors import ConfigurationError

__all__ = [
    "JITTERS",
    "Jitter",
    "backoff",
    "parse_retry_after",
    "retry_after_of",
    "validate_seconds",
    "waits",
]

Jitter = Literal["full", "equal", "decorrelated"]
JITTERS: Final = ("full", "equal", "decorrelated")

# 2**62 times any sane base is far past any cap: stop doubling there rather than overflow.
_MAX_DOUBLINGS: Final = 62


def backoff(
    jitter: Jitter, retry: int, previous: float, *, base: float, cap: float, rng: random.Random
) -> float:
    """Return the jittered wait in seconds before retry number *retry* (0 for the first).

    *previous* is the wait drawn before the last retry (``base`` before the first); only
    decorrelated jitter uses it. Every result lies in ``[0, cap]``, and decorrelated ones
    in ``[base, cap]``.
    """
    if jitter == "decorrelated":
        return rng.uniform(base, min(cap, 3.0 * previous))
    ceiling = cap if retry >= _MAX_DOUBLINGS else min(cap, base * (1 << retry))
    if jitter == "full":
        return rng.uniform(0.0, ceiling)
    half = ceiling / 2.0
    return half + rng.uniform(0.0, half)


def parse_retry_after(value: str, now: float) -> float | None:
    """Return the seconds a ``Retry-After`` field value asks to wait, or ``None``.

    *value* is delay-seconds (``"120"``; a decimal fraction is accepted too) or an
    HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``), read against *now*, the wall-clock
    time in seconds since the epoch. A date in the past means no wait (0.0); a value that
    is neither form is ignored (``None``).
    """
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def retry_after_of(outcome: object, now: float) -> float | None:
    """Return how long *outcome* (an exception or a return value) asks to wait, or ``None``.

    Read, in order: a numeric ``retry_after`` attribute (:class:`~resilient.RateLimitExceeded`,
    :class:`~resilient.BackendUnavailable` and :class:`~resilient.CircuitOpenError` carry
    one); the ``Retry-After`` header of an HTTP response, which is *outcome* itself when
    it has ``headers`` (an ``httpx.Response``) or its ``response`` attribute (an
    ``httpx.HTTPStatusError``).
    """
    seconds = getattr(outcome, "retry_after", None)
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        return float(seconds) if math.isfinite(seconds) and seconds >= 0 else None
    response = outcome if hasattr(outcome, "headers") else getattr(outcome, "response", None)
    headers = getattr(response, "headers", None)
    if not isinstance(headers, Mapping):
        return None
    # httpx's Headers are case-insensitive; a plain dict is tried in the usual spellings.
    value = headers.get("Retry-After", headers.get("retry-after"))
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return parse_retry_after(value, now) if isinstance(value, str) else None


def validate_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return *value* as a float if it is a finite number of seconds > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} must be a number of seconds, not {value!r}"
        raise ConfigurationError(msg)
    if not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        msg = f"{name} must be a finite number of seconds {bound}, not {value!r}"
        raise ConfigurationError(msg)
    return float(value)


class _Waits:
    """Whether retries really wait; :mod:`resilient.testing` turns waiting off."""

    __slots__ = ("enabled",)

    def __init__(self) -> None:
        self.enabled = True


waits: Final = _Waits()
