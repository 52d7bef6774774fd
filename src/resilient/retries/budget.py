"""``RetryBudget``: retries as a share of calls, so a struggling service is not piled on."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from resilient.clock import Clock
from resilient.errors import BackendError, ConfigurationError
from resilient.retries.core import validate_seconds

if TYPE_CHECKING:
    from resilient.backends.redis import RedisBackend

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

    With *backend* (a :class:`~resilient.RedisBackend`) and a *name*, every instance of a
    service shares one budget: each keeps its deposits and withdrawals locally and, at
    most every *sync_interval* seconds (from async code), adds them to the shared balance
    in Redis and reads it back in one script call. Decisions in between use the last
    balance read plus what this instance did since, so instances may overshoot by what
    they do in one interval. The reserve stays per instance. While Redis is unreachable
    (or before the first sync), each instance uses its own local budget.
    """

    __slots__ = (
        "_backend",
        "_balances",
        "_deposit",
        "_epochs",
        "_key",
        "_last_attempt",
        "_lock",
        "_monotonic",
        "_pending",
        "_remote",
        "_reserve",
        "_slice",
        "_synced_at",
        "_syncing",
        "_task",
        "_wall",
        "min_per_second",
        "name",
        "ratio",
        "sync_interval",
        "window",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10,
        window: float = 10.0,
        backend: RedisBackend | None = None,
        name: str | None = None,
        sync_interval: float = 1.0,
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
        self.name = name
        self.sync_interval = validate_seconds("sync_interval", sync_interval)
        self._backend = backend
        self._key = ""
        if backend is not None:
            from resilient.backends.redis import RedisBackend  # noqa: PLC0415

            if not isinstance(backend, RedisBackend):
                msg = f"a shared retry budget needs a RedisBackend, not {backend!r}"
                raise ConfigurationError(msg)
            if not name:
                msg = "a retry budget shared through Redis needs a name"
                raise ConfigurationError(msg)
            self._key = backend.key("rb", name, "b")
        self._wall: Callable[[], float] = time.time if clock is None else clock.time
        self._pending = 0  # this instance's tokens not yet added to the shared balance
        self._remote = 0  # the shared balance at the last sync
        self._synced_at = -math.inf
        self._last_attempt = -math.inf
        self._syncing = False
        self._task: asyncio.Task[None] | None = None

    def deposit(self) -> None:
        """Record a call: add *ratio* tokens."""
        with self._lock:
            self._add(self._deposit)
            if self._backend is not None:
                self._pending += self._deposit
        if self._backend is not None:
            self._maybe_sync()

    def try_withdraw(self) -> bool:
        """Take one token for a retry; return ``False`` (and take nothing) when empty."""
        with self._lock:
            if self._current() < _UNIT:
                return False
            self._add(-_UNIT)
            if self._backend is not None:
                self._pending -= _UNIT
        if self._backend is not None:
            self._maybe_sync()
        return True

    @property
    def balance(self) -> float:
        """The tokens available now: the retries that would be allowed, as a float."""
        with self._lock:
            return self._current() / _UNIT

    def _current(self) -> int:
        if self._backend is not None and self._monotonic() - self._synced_at <= max(
            3 * self.sync_interval, self._slice
        ):
            return self._reserve + self._remote + self._pending
        return self._balance()

    def _maybe_sync(self) -> None:
        now = self._monotonic()
        if self._syncing or now - self._last_attempt < self.sync_interval:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # sync code without a loop: decide locally
        self._syncing = True
        self._last_attempt = now
        self._task = loop.create_task(self._sync_task())

    async def _sync_task(self) -> None:
        try:
            await self.sync_now()
        except BackendError:
            pass  # this instance decides on its own until Redis answers again
        finally:
            self._syncing = False

    async def wait_for_sync(self) -> None:
        """Wait until the background sync in flight, if any, has ended.

        Async callers sync in the background (see the class docstring), so a deposit
        returns before Redis has it. Await this where the shared balance must hold what
        this instance did, at shutdown say, or in a test. Cancelling the wait does not
        cancel the sync; the sync's failure is not raised here (the tokens stay pending).
        """
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    async def sync_now(self) -> None:
        """Add this instance's pending tokens to the shared balance and read it back.

        Raise :class:`~resilient.errors.BackendError` when Redis fails (the pending
        tokens are kept for the next sync).
        """
        backend = self._backend
        if backend is None:
            return
        from resilient.retries.redis import BUDGET  # noqa: PLC0415

        with self._lock:
            delta, self._pending = self._pending, 0
        slice_ms = max(1, round(self._slice * 1000))
        try:
            total = await backend.run_script(
                BUDGET, [self._key], (round(self._wall() * 1000), slice_ms, _SLICES, delta)
            )
        except BackendError:
            with self._lock:
                self._pending += delta
            raise
        with self._lock:
            self._remote = int(total)
            self._synced_at = self._monotonic()

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
