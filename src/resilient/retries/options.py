"""The options of a retry policy: named once, validated once, frozen.

:func:`~resilient.retry` takes them as keyword arguments and builds a :class:`RetryOptions`;
a :class:`~resilient.retries.Retry` holds it, and the decisions of its retries read it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from resilient.clock import Clock
from resilient.errors import ConfigurationError
from resilient.events import Observer
from resilient.retries.budget import RetryBudget
from resilient.retries.core import JITTERS, Jitter, validate_seconds

__all__ = ["RetryOn", "RetryOptions"]

RetryOn = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
"""What ``on=`` accepts: exception types, or a predicate on the exception."""

# Never retried, whatever `on=` says (ConfigurationError is a ValueError, so `on=ValueError`
# would otherwise catch it): a misconfiguration does not heal by trying again.
_NEVER_RETRIED: Final = (ConfigurationError,)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryOptions:
    """The options of one retry policy, as :func:`~resilient.retry` documents them.

    Built by :func:`~resilient.retry`, which gives every option its default; bad values
    raise :class:`~resilient.ConfigurationError` here. Seconds are kept as floats.
    """

    attempts: int
    deadline: float | None
    jitter: Jitter
    base: float
    cap: float
    on: RetryOn
    result: Callable[[Any], bool] | None
    budget: RetryBudget | None
    name: str | None
    clock: Clock | None
    sleep: Callable[[float], object] | None
    rng: random.Random | None
    observer: Observer | None
    _on: Callable[[Exception], bool] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        attempts, jitter = self.attempts, self.jitter
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            msg = f"attempts counts every try, the first included: an int >= 1, not {attempts!r}"
            raise ConfigurationError(msg)
        if jitter not in JITTERS:
            msg = f"jitter must be one of {', '.join(map(repr, JITTERS))}, not {jitter!r}"
            raise ConfigurationError(msg)
        base, cap = validate_seconds("base", self.base), validate_seconds("cap", self.cap)
        if cap < base:
            msg = f"cap ({self.cap!r}) must not be below base ({self.base!r})"
            raise ConfigurationError(msg)
        deadline = self.deadline
        if deadline is not None:
            deadline = validate_seconds("deadline", deadline)
        on = _exception_predicate(self.on)
        if self.result is not None and not callable(self.result):
            msg = f"result must be a predicate on the return value, not {self.result!r}"
            raise ConfigurationError(msg)
        if self.budget is not None and not isinstance(self.budget, RetryBudget):
            msg = f"budget must be a RetryBudget, not {self.budget!r}"
            raise ConfigurationError(msg)
        if self.sleep is not None and not callable(self.sleep):
            msg = f"sleep must be a function of seconds, not {self.sleep!r}"
            raise ConfigurationError(msg)
        if self.rng is not None and not isinstance(self.rng, random.Random):
            msg = f"rng must be a random.Random, not {self.rng!r}"
            raise ConfigurationError(msg)
        for name, value in (("base", base), ("cap", cap), ("deadline", deadline), ("_on", on)):
            object.__setattr__(self, name, value)  # frozen: the normal form, set once

    def retryable(self, error: BaseException) -> bool:
        """Return whether *error* is retried (attempts left permitting).

        It is when *on* says so, and it is an :class:`Exception` but not a
        :class:`~resilient.ConfigurationError`.
        """
        return (
            isinstance(error, Exception)
            and not isinstance(error, _NEVER_RETRIED)
            and self._on(error)
        )


def _exception_predicate(on: RetryOn) -> Callable[[Exception], bool]:
    if isinstance(on, type):
        on = (on,)
    if isinstance(on, tuple):
        for kind in on:
            if not isinstance(kind, type) or not issubclass(kind, BaseException):
                msg = f"on= takes exception types or a predicate, not {kind!r}"
                raise ConfigurationError(msg)
            if not issubclass(kind, Exception):
                msg = (
                    f"{kind.__name__} is not an Exception: cancellation, KeyboardInterrupt "
                    "and SystemExit are never retried"
                )
                raise ConfigurationError(msg)
        kinds = on
        return lambda error: isinstance(error, kinds)
    if callable(on):
        return on
    msg = f"on= takes exception types or a predicate, not {on!r}"
    raise ConfigurationError(msg)
