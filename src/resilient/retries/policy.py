"""``retry``: call again after a failure, with jittered backoff, decided by tenacity.

A call that succeeds at once never meets tenacity: the decorated function is called
directly, and tenacity is imported only after a first failure worth retrying. From there
one core decides for ``def``, ``async def`` and blocks alike: :meth:`Retry.steps` yields
what the call needs next (wait so long, or make one more :class:`Attempt`) and asks
tenacity (:mod:`resilient.retries.flow`) after each attempt whether to go on. The drivers
are thin: one sync and one async for functions, one sync and one async for blocks, each
calling or yielding the attempts and sleeping the waits, as the core says.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast, overload

from resilient.clock import Clock
from resilient.errors import ConfigurationError
from resilient.events import LoggingObserver, Observer
from resilient.retries.budget import RetryBudget
from resilient.retries.core import Jitter, waits
from resilient.retries.options import RetryOn, RetryOptions

if TYPE_CHECKING:
    import random

    from resilient.retries.flow import Decider

__all__ = ["Attempt", "Attempts", "Retry", "retry"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

DEFAULT_OBSERVER: Final = LoggingObserver()


def retry(
    *,
    attempts: int = 3,
    deadline: float | None = None,
    jitter: Jitter = "full",
    base: float = 0.1,
    cap: float = 10.0,
    on: RetryOn = Exception,
    result: Callable[[Any], bool] | None = None,
    budget: RetryBudget | None = None,
    name: str | None = None,
    clock: Clock | None = None,
    sleep: Callable[[float], object] | None = None,
    rng: random.Random | None = None,
    observer: Observer | None = DEFAULT_OBSERVER,
) -> Retry:
    """Retry a function or a block of code after failures, with jittered exponential backoff.

    Use it as a decorator, on ``def`` and ``async def`` alike, or drive a block::

        @retry(attempts=5, on=httpx.TransportError, deadline=10)
        async def fetch(url: str) -> httpx.Response: ...

        for attempt in retry(attempts=3).attempts():   # or `async for`
            with attempt:
                rows = load()

    *attempts* counts every try, the first included. *deadline* bounds the whole call,
    waits included, in seconds: a retry whose wait would reach it is not made. Waits
    follow *jitter* (``"full"``, ``"equal"`` or ``"decorrelated"``, see
    :mod:`resilient.retries.core`) from *base* up to *cap* seconds, and are stretched to
    what the failure asks for: a ``retry_after`` attribute
    (:class:`~resilient.RateLimitExceeded`, :class:`~resilient.CircuitOpenError`, ...)
    or a ``Retry-After`` header (of an ``httpx.Response`` result, or of an exception's
    ``response``).

    *on* says which exceptions are retried: types (default: any :class:`Exception`) or a
    predicate; ``on=()`` retries none. :class:`~resilient.ConfigurationError` and
    anything that is not an :class:`Exception` (cancellation, ``KeyboardInterrupt``) are
    never retried. *result*, a predicate on the return value, retries results too (say
    a 503 response); when retries run out the last result is returned, and the last
    exception is re-raised with its own traceback.

    A shared *budget* caps retries at a share of all calls. *clock*, *sleep* (sync, or
    async for async functions) and *rng* are there for tests, as is
    :func:`resilient.testing.retries_without_waits`. Events (:class:`RetryScheduled`,
    :class:`RetryGaveUp`, :class:`RetryBudgetExhausted` in :mod:`resilient.events`) go
    to *observer*, named by *name* (default: the function's qualified name).

    Bad options raise :class:`~resilient.ConfigurationError` here, at decoration time.
    """
    # Each parameter is the option of the same name, spelled once more in RetryOptions
    # (a test holds the two lists equal).
    return Retry(RetryOptions(**locals()))


class Retry:
    """A retry policy, made by :func:`retry`: a decorator, and :meth:`attempts` for blocks.

    ``options`` holds what :func:`retry` was given, validated (a :class:`RetryOptions`).
    """

    __slots__ = ("_decider", "_monotonic", "options")

    def __init__(self, options: RetryOptions) -> None:
        self.options = options
        clock = options.clock
        self._monotonic: Callable[[], float] = time.monotonic if clock is None else clock.monotonic
        self._decider: Decider | None = None  # made on the first failure worth retrying

    @property
    def name(self) -> str | None:
        """The name events carry; ``None`` names them after the decorated function."""
        return self.options.name

    def narrowed(
        self,
        *,
        on: RetryOn | None = None,
        result: Callable[[Any], bool] | None = None,
        name: str | None = None,
    ) -> Retry:
        """Return a copy that retries only what this policy *and* the given *on*/*result* allow.

        Waits, deadline, budget, clock, sleep and observer are shared with this policy. A
        library that knows which failures of its own are worth retrying (the httpx
        transport, say) narrows its user's policy this way; *name*, if given, names it.
        """
        changes: dict[str, Any] = {}
        if on is not None:
            # Checked as retry(on=...) checks it; then both must allow an error.
            mine, theirs = self.retryable, replace(self.options, on=on).retryable
            changes["on"] = lambda error: theirs(error) and mine(error)
        if result is not None:
            own = self.options.result
            changes["result"] = (
                result if own is None else (lambda value: bool(result(value)) and bool(own(value)))
            )
        if name is not None:
            changes["name"] = name
        return Retry(replace(self.options, **changes))

    def retryable(self, error: BaseException) -> bool:
        """Return whether this policy retries after *error* (attempts left permitting)."""
        return self.options.retryable(error)

    @overload
    def __call__(
        self, function: Callable[_P, Coroutine[Any, Any, _R]]
    ) -> Callable[_P, Coroutine[Any, Any, _R]]: ...

    @overload
    def __call__(self, function: Callable[_P, _R]) -> Callable[_P, _R]: ...

    def __call__(self, function: Callable[_P, Any]) -> Callable[_P, Any]:
        """Decorate *function* (``def`` or ``async def``) so that failed calls are retried."""
        if not callable(function):
            msg = f"retry decorates functions; {function!r} is not callable"
            raise TypeError(msg)
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            msg = f"retry cannot decorate a generator function ({function!r})"
            raise TypeError(msg)
        name = self.options.name or _name_of(function)
        if inspect.iscoroutinefunction(function):
            return self._decorate_async(function, name)
        self.check_sync_sleep(name)
        return self._decorate_sync(function, name)

    def attempts(self) -> Attempts:
        """Return the attempts of a block of code, for ``for`` and ``async for`` alike.

        Each attempt is a context manager that swallows a retryable exception; the loop
        then waits and goes round again, or gives up by raising the last exception::

            for attempt in retry(attempts=3, on=OSError).attempts():
                with attempt:
                    data = path.read_bytes()

        A block has no return value, so a policy with ``result=`` cannot drive one.
        """
        if self.options.result is not None:
            msg = "a retry policy with result= decorates functions; a block returns nothing"
            raise ConfigurationError(msg)
        name = self.options.name or "<block>"
        return Attempts(partial(self._attempts_sync, name), partial(self._attempts_async, name))

    def __repr__(self) -> str:
        options = self.options
        return (
            f"Retry(attempts={options.attempts!r}, deadline={options.deadline!r}, "
            f"jitter={options.jitter!r}, base={options.base!r}, cap={options.cap!r})"
        )

    # The core: what a call needs next, decided once for every driver (public, for
    # drivers of their own: begin, steps, pause, pause_async).

    def steps(
        self, first: Attempt, name: str, started: float
    ) -> Generator[float | Attempt, None, Attempt]:
        """After a *first* attempt worth retrying, yield the waits and the attempts to make.

        The driver sleeps a wait (a float; :meth:`pause` or :meth:`pause_async`), and
        makes an :class:`Attempt` (under ``with``, keeping a return value in its ``value``)
        before asking for the next step. Returns, when the call gives up or an attempt ends
        it, the last attempt: what the caller gets (:meth:`Attempt.outcome`). *started* is
        from :meth:`begin`; *first* is the first attempt, judged worth retrying by
        :meth:`retryable` (an error) or by ``options.result`` (a value). This is the core
        the decorator and :meth:`attempts` drive; code that drives its own calls (the
        httpx transports) drives it the same way.
        """
        decider = self._decider
        if decider is None:
            from resilient.retries.flow import Decider  # noqa: PLC0415 (only a failure pays for tenacity)

            decider = self._decider = Decider(self.options)
        retries = decider.start(name, started)
        last = first
        while (wait := retries.after(last)) is not None:
            yield wait
            last = Attempt(retries.attempt_number)
            yield last
        return last

    def _block(self, name: str) -> Iterator[float | Attempt]:
        """Yield the steps of a block: its first attempt, then :meth:`steps` if it failed."""
        started = self.begin()
        first = Attempt(1, catches=self.retryable)
        yield first
        if first.error is not None:
            last = yield from self.steps(first, name, started)
            last.outcome()  # raises what the last attempt raised

    def _starter(self) -> Callable[[], float] | None:
        """Return the cheapest way to :meth:`begin` a call, or ``None`` for nothing to do."""
        options = self.options
        if options.budget is None:
            return None if options.deadline is None else self._monotonic
        return self.begin

    def begin(self) -> float:
        """Begin a call driven by hand: feed the budget; return when it began, for :meth:`steps`.

        The time is read only when a deadline needs it (else 0.0).
        """
        options = self.options
        if options.budget is not None:
            options.budget.deposit()
        return self._monotonic() if options.deadline is not None else 0.0

    # The drivers: each calls or yields the attempts and sleeps the waits, as the core says.

    def _first_failure(self, error: Exception) -> Attempt | None:
        """Return the failed first attempt of a call, or ``None`` when it is not retried."""
        return Attempt(1, error=error) if self.retryable(error) else None

    def _decorate_sync(self, function: Callable[_P, _R], name: str) -> Callable[_P, _R]:
        wanted, start, first_failure = self.options.result, self._starter(), self._first_failure

        @functools.wraps(function)
        def retried(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            started = start() if start else 0.0
            first = None
            try:
                result = function(*args, **kwargs)
            except Exception as error:
                if (first := first_failure(error)) is None:
                    raise
            if first is None and (wanted is None or not wanted(result)):
                return result
            # Out of the `except` block, so that later failures do not chain to the first.
            return self._retry_sync(
                first or Attempt(1, value=result), name, started, partial(function, *args, **kwargs)
            )

        return retried

    def _decorate_async(
        self, function: Callable[_P, Coroutine[Any, Any, _R]], name: str
    ) -> Callable[_P, Coroutine[Any, Any, _R]]:
        wanted, start, first_failure = self.options.result, self._starter(), self._first_failure

        @functools.wraps(function)
        async def retried(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            started = start() if start else 0.0
            first = None
            try:
                result = await function(*args, **kwargs)
            except Exception as error:
                if (first := first_failure(error)) is None:
                    raise
            if first is None and (wanted is None or not wanted(result)):
                return result
            return await self._retry_async(
                first or Attempt(1, value=result), name, started, partial(function, *args, **kwargs)
            )

        return retried

    def _retry_sync(self, first: Attempt, name: str, started: float, call: Callable[[], _R]) -> _R:
        last = first
        for step in self.steps(first, name, started):
            if isinstance(step, Attempt):
                last = step
                with step:
                    step.value = call()
            else:
                self.pause(step)
        return cast("_R", last.outcome())

    async def _retry_async(
        self, first: Attempt, name: str, started: float, call: Callable[[], Awaitable[_R]]
    ) -> _R:
        last = first
        for step in self.steps(first, name, started):
            if isinstance(step, Attempt):
                last = step
                with step:
                    step.value = await call()
            else:
                await self.pause_async(step)
        return cast("_R", last.outcome())

    def _attempts_sync(self, name: str) -> Iterator[Attempt]:
        self.check_sync_sleep(name)
        for step in self._block(name):
            if isinstance(step, Attempt):
                yield step
            else:
                self.pause(step)

    async def _attempts_async(self, name: str) -> AsyncIterator[Attempt]:
        for step in self._block(name):
            if isinstance(step, Attempt):
                yield step
            else:
                await self.pause_async(step)

    def check_sync_sleep(self, name: str) -> None:
        """Raise :class:`~resilient.ConfigurationError` if sync code (*name*) got an async sleep."""
        sleep = self.options.sleep
        if sleep is not None and inspect.iscoroutinefunction(sleep):
            msg = f"{name} is synchronous, so sleep must be too; {sleep!r} is async"
            raise ConfigurationError(msg)

    def pause(self, seconds: float) -> None:
        """Wait *seconds* (a wait :meth:`steps` yielded) with the policy's sync ``sleep``."""
        if waits.enabled:
            (self.options.sleep or time.sleep)(seconds)

    async def pause_async(self, seconds: float) -> None:
        """:meth:`pause` for async code: awaits the policy's ``sleep`` if it is async."""
        if waits.enabled:
            slept = (self.options.sleep or asyncio.sleep)(seconds)
            if inspect.isawaitable(slept):
                await slept


class Attempts:
    """The attempts of a block of code, from :meth:`Retry.attempts`.

    Iterate with ``for`` in sync code and ``async for`` in async code; each iteration
    yields an :class:`Attempt`, which the block must run under ``with``.
    """

    __slots__ = ("_async", "_sync")

    def __init__(
        self, sync: Callable[[], Iterator[Attempt]], async_: Callable[[], AsyncIterator[Attempt]]
    ) -> None:
        self._sync = sync
        self._async = async_

    def __iter__(self) -> Iterator[Attempt]:
        return self._sync()

    def __aiter__(self) -> AsyncIterator[Attempt]:
        return self._async()


def _catch_all(error: BaseException) -> bool:
    return True


class Attempt:
    """One attempt of a block: ``with attempt: ...``; ``number`` counts from 1.

    On leaving the ``with``, a retryable exception is swallowed (the loop decides what
    comes next) and kept in ``error``; any other exception of the first attempt
    propagates. After the first, an attempt keeps whatever it raised, and the loop
    decides whether it ends the call. ``value`` is what a decorated function returned
    (a block leaves it ``None``).
    """

    __slots__ = ("_catches", "error", "number", "value")

    def __init__(
        self,
        number: int,
        *,
        catches: Callable[[BaseException], bool] = _catch_all,
        error: BaseException | None = None,
        value: object = None,
    ) -> None:
        self.number = number
        self.error = error
        self.value = value
        self._catches = catches

    def outcome(self) -> object:
        """Return what the attempt returned, or raise what it raised."""
        if self.error is not None:
            raise self.error
        return self.value

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if error is None or not self._catches(error):
            return False
        self.error = error
        return True

    def __repr__(self) -> str:
        return f"<Attempt {self.number}>"


def _name_of(function: Callable[..., Any]) -> str:
    """Name *function* for events: ``module.qualname``, or its class for other callables."""
    qualname = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None) or type(function).__module__
    return f"{module}.{qualname}"
