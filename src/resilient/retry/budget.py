"""``RetryBudget``: retries as a share of calls, so a struggling service is not piled on."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Final

from resilient.clock import Clock
from resilient.errors import ConfigurationError
from resilient.retry.core import validate_seconds

__all__ = ["RetryBudget"]

# Tokens are counted in millionths, in integers: a long run of 0.2 deposits and 1.0
# withdrawals must leave exactly the balance it should, with no float drift.
_UNIT: Final = 1_000_000
_SLICES: Final = 10


class RetryBudget:
    """Allow retries only up to a share of recent calls (the Finagle / gRPC retry budget).

    Every call deposits *ratio* tokens and every retry withdraws one, so with the default
    0.2 at most one call in five is retried, however many attempts each call allows. A
    reserve of *min_per_second* * *window* tokens is always there, so a quiet service
    can still retry (about *min_per_second* retries a second). Deposits and withdrawals
    expire *window* seconds after they were made; they are kept in ten time slices, so
    memory is constant and expiry is precise to a tenth of the window.

    Share one budget between every call to the same dependency::

        payments = RetryBudget(ratio=0.1)

        @retry(attempts=4, budget=payments)
        async def charge(order: Order) -> Receipt: ...

    When the budget is empty, :func:`~resilient.retry` gives up (the last error is raised)
    and emits :class:`~resilient.events.RetryBudgetExhausted`. Thread-safe.
    """

    __slots__ = (
        "_balances",
        "_deposit",
        "_epochs",
        "_lock",
        "_monotonic",
        "_reserve",
        "_slice",
        "min_per_second",
        "ratio",
        "window",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10,
        window: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            msg = f"ratio must be a number of retries per call, not {ratio!r}"
            raise ConfigurationError(msg)
        if not 0 <= ratio <= 1000:
            msg = f"ratio must be between 0 and 1000 retries per call, not {ratio!r}"
            raise ConfigurationError(msg)
        if isinstance(min_per_second, bool) or not isinstance(min_per_second, int | float):
            msg = f"min_per_second must be a number of retries, not {min_per_second!r}"
            raise ConfigurationError(msg)
        if not math.isfinite(min_per_second) or min_per_second < 0:
            msg = f"min_per_second must be a finite number >= 0, not {min_per_second!r}"
            raise ConfigurationError(msg)
        self.ratio = float(ratio)
        self.min_per_second = float(min_per_second)
        self.window = validate_seconds("window", window)
        self._deposit = round(self.ratio * _UNIT)
        self._reserve = round(self.min_per_second * self.window * _UNIT)
        self._slice = self.window / _SLICES
        self._monotonic: Callable[[], float] = time.monotonic if clock is None else clock.monotonic
        self._epochs = [-1] * _SLICES  # which slice of time each entry currently holds
        self._balances = [0] * _SLICES  # deposits minus withdrawals in that slice
        self._lock = threading.Lock()

    def deposit(self) -> None:
        """Record a call: add *ratio* tokens."""
        with self._lock:
            self._add(self._deposit)

    def try_withdraw(self) -> bool:
        """Take one token for a retry; return ``False`` (and take nothing) when empty."""
        with self._lock:
            if self._balance() < _UNIT:
                return False
            self._add(-_UNIT)
            return True

    @property
    def balance(self) -> float:
        """The tokens available now: the retries that would be allowed, as a float."""
        with self._lock:
            return self._balance() / _UNIT

    def _add(self, amount: int) -> None:
        epoch = int(self._monotonic() // self._slice)
        index = epoch % _SLICES
        if self._epochs[index] != epoch:  # the slice held older, now expired, tokens
            self._epochs[index] = epoch
            self._balances[index] = 0
        self._balances[index] += amount

    def _balance(self) -> int:
        oldest = int(self._monotonic() // self._slice) - _SLICES + 1
        live = sum(
            balance
            for epoch, balance in zip(self._epochs, self._balances, strict=True)
            if epoch >= oldest
        )
        return self._reserve + live

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio!r}, min_per_second={self.min_per_second!r}, "
            f"window={self.window!r})"
        )
