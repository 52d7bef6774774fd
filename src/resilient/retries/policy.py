"""``retry``: call again after a failure, with jittered backoff, driven by tenacity.

A call that succeeds at once never meets tenacity: the decorated function is called
directly, and tenacity is imported and set up only after a first failure worth retrying.
That failure is then handed to a ``tenacity.Retrying`` (or ``AsyncRetrying``) whose stop,
wait and retry strategies are the methods of one :class:`_Call`, the state of this call's
retries: tenacity drives the loop, our strategies make every decision.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast, overload

from resilient.clock import Clock
from resilient.errors import ConfigurationError
from resilient.events import (
    LoggingObserver,
    Observer,
    RetryBudgetExhausted,
    RetryGaveUp,
    RetryScheduled,
    emit,
)
from resilient.retries.budget import RetryBudget
from resilient.retries.core import JITTERS, Jitter, backoff, retry_after_of, validate_seconds, waits

if TYPE_CHECKING:
    from tenacity import AttemptManager, RetryCallState

__all__ = ["Attempt", "Attempts", "Retry", "retry"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

DEFAULT_OBSERVER: Final = LoggingObserver()

RetryOn = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
"""What ``on=`` accepts: exception types, or a predicate on the exception."""

# Never retried, whatever `on=` says (ConfigurationError is a ValueError, so `on=ValueError`
# would otherwise catch it): a misconfiguration does not heal by trying again.
_NEVER_RETRIED: Final = (ConfigurationError,)


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
    return Retry(
        attempts=attempts,
        deadline=deadline,
        jitter=jitter,
        base=base,
        cap=cap,
        on=on,
        result=result,
        budget=budget,
        name=name,
        clock=clock,
        sleep=sleep,
        rng=rng,
        observer=observer,
    )


class Retry:
    """A retry policy, made by :func:`retry`: a decorator, and :meth:`attempts` for blocks."""

    __slots__ = (
        "_monotonic",
        "_on",
        "_sleep",
        "_time",
        "base",
        "budget",
        "cap",
        "deadline",
        "jitter",
        "max_attempts",
        "name",
        "observer",
        "result",
        "rng",
    )

    def __init__(
        self,
        *,
        attempts: int,
        deadline: float | None,
        jitter: Jitter,
        base: float,
        cap: float,
        on: RetryOn,
        result: Callable[[Any], bool] | None,
        budget: RetryBudget | None,
        name: str | None,
        clock: Clock | None,
        sleep: Callable[[float], object] | None,
        rng: random.Random | None,
        observer: Observer | None,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            msg = f"attempts counts every try, the first included: an int >= 1, not {attempts!r}"
            raise ConfigurationError(msg)
        if jitter not in JITTERS:
            msg = f"jitter must be one of {', '.join(map(repr, JITTERS))}, not {jitter!r}"
            raise ConfigurationError(msg)
        self.base = validate_seconds("base", base)
        self.cap = validate_seconds("cap", cap)
        if self.cap < self.base:
            msg = f"cap ({cap!r}) must not be below base ({base!r})"
            raise ConfigurationError(msg)
        self.deadline = None if deadline is None else validate_seconds("deadline", deadline)
        self._on = _exception_predicate(on)
        if result is not None and not callable(result):
            msg = f"result must be a predicate on the return value, not {result!r}"
            raise ConfigurationError(msg)
        if budget is not None and not isinstance(budget, RetryBudget):
            msg = f"budget must be a RetryBudget, not {budget!r}"
            raise ConfigurationError(msg)
        if sleep is not None and not callable(sleep):
            msg = f"sleep must be a function of seconds, not {sleep!r}"
            raise ConfigurationError(msg)
        if rng is not None and not isinstance(rng, random.Random):
            msg = f"rng must be a random.Random, not {rng!r}"
            raise ConfigurationError(msg)
        self.max_attempts = attempts
        self.jitter: Jitter = jitter
        self.result = result
        self.budget = budget
        self.name = name
        self.rng = rng or random.Random()  # noqa: S311 (jitter, not cryptography)
        self.observer = observer
        self._sleep = sleep
        self._monotonic: Callable[[], float] = time.monotonic if clock is None else clock.monotonic
        self._time: Callable[[], float] = time.time if clock is None else clock.time

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
        copy = object.__new__(Retry)
        for slot in Retry.__slots__:
            setattr(copy, slot, getattr(self, slot))
        if on is not None:
            mine, theirs = self._on, _exception_predicate(on)
            copy._on = lambda error: theirs(error) and mine(error)
        if result is not None:
            own_result = self.result
            copy.result = (
                result
                if own_result is None
                else (lambda value: bool(result(value)) and bool(own_result(value)))
            )
        if name is not None:
            copy.name = name
        return copy

    def retryable(self, error: BaseException) -> bool:
        """Return whether this policy retries after *error* (attempts left permitting)."""
        return (
            isinstance(error, Exception)
            and not isinstance(error, _NEVER_RETRIED)
            and self._on(error)
        )

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
        name = self.name or _name_of(function)
        if inspect.iscoroutinefunction(function):
            return self._decorate_async(function, name)
        self._check_sync_sleep(name)
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
        if self.result is not None:
            msg = "a retry policy with result= decorates functions; a block returns nothing"
            raise ConfigurationError(msg)
        return Attempts(self, self.name or "<block>")

    def _check_sync_sleep(self, name: str) -> None:
        if self._sleep is not None and inspect.iscoroutinefunction(self._sleep):
            msg = f"{name} is synchronous, so sleep must be too; {self._sleep!r} is async"
            raise ConfigurationError(msg)

    def _decorate_sync(self, function: Callable[_P, _R], name: str) -> Callable[_P, _R]:
        retryable, wanted, budget = self.retryable, self.result, self.budget
        monotonic, timed = self._monotonic, self.deadline is not None

        @functools.wraps(function)
        def retried(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            started = monotonic() if timed else 0.0  # only a deadline needs the time
            if budget is not None:
                budget.deposit()
            try:
                result = function(*args, **kwargs)
            except Exception as error:
                if not retryable(error):
                    raise
                first = _Outcome(error, None)
            else:
                if wanted is None or not wanted(result):
                    return result
                first = _Outcome(None, result)
            # Out of the `except` block, so that later failures do not chain to this one.
            return self._retry_sync(_Call(self, name, started), first, function, args, kwargs)

        return retried

    def _decorate_async(
        self, function: Callable[_P, Coroutine[Any, Any, _R]], name: str
    ) -> Callable[_P, Coroutine[Any, Any, _R]]:
        retryable, wanted, budget = self.retryable, self.result, self.budget
        monotonic, timed = self._monotonic, self.deadline is not None

        @functools.wraps(function)
        async def retried(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            started = monotonic() if timed else 0.0  # only a deadline needs the time
            if budget is not None:
                budget.deposit()
            try:
                result = await function(*args, **kwargs)
            except Exception as error:
                if not retryable(error):
                    raise
                first = _Outcome(error, None)
            else:
                if wanted is None or not wanted(result):
                    return result
                first = _Outcome(None, result)
            call = _Call(self, name, started)
            return await self._retry_async(call, first, function, args, kwargs)

        return retried

    def _retry_sync(
        self, call: _Call, first: _Outcome, function: Callable[..., _R], args: Any, kwargs: Any
    ) -> _R:
        import tenacity  # noqa: PLC0415 (only a failure pays for importing tenacity)

        pending = [first]

        def attempt() -> _R:
            if pending:  # the first attempt already ran: hand its outcome to tenacity
                return cast("_R", pending.pop().replay())
            return function(*args, **kwargs)

        retrying = tenacity.Retrying(
            stop=call.stop,
            wait=call.wait,
            retry=call.should_retry,
            sleep=call.sleep,
            retry_error_callback=_last_outcome,
        )
        return retrying(attempt)

    async def _retry_async(
        self,
        call: _Call,
        first: _Outcome,
        function: Callable[..., Awaitable[_R]],
        args: Any,
        kwargs: Any,
    ) -> _R:
        import tenacity  # noqa: PLC0415 (only a failure pays for importing tenacity)

        pending = [first]

        async def attempt() -> _R:
            if pending:
                return cast("_R", pending.pop().replay())
            return await function(*args, **kwargs)

        retrying = tenacity.AsyncRetrying(
            stop=call.stop,
            wait=call.wait,
            retry=call.should_retry,
            sleep=call.async_sleep,
            retry_error_callback=_last_outcome,
        )
        return await retrying(attempt)

    def _attempts_sync(self, name: str) -> Iterator[Attempt]:
        self._check_sync_sleep(name)
        started = self._monotonic()
        if self.budget is not None:
            self.budget.deposit()
        first = Attempt(1, self.retryable)
        yield first
        if first.error is None:
            return
        import tenacity  # noqa: PLC0415 (only a failure pays for importing tenacity)

        call = _Call(self, name, started)
        managers = iter(
            tenacity.Retrying(
                stop=call.stop,
                wait=call.wait,
                retry=call.should_retry,
                sleep=call.sleep,
                retry_error_callback=_last_outcome,
            )
        )
        with next(managers):  # tenacity's first attempt is the one that already failed
            raise first.error
        for manager in managers:
            yield Attempt(manager.retry_state.attempt_number, self.retryable, manager)

    async def _attempts_async(self, name: str) -> AsyncIterator[Attempt]:
        started = self._monotonic()
        if self.budget is not None:
            self.budget.deposit()
        first = Attempt(1, self.retryable)
        yield first
        if first.error is None:
            return
        import tenacity  # noqa: PLC0415 (only a failure pays for importing tenacity)

        call = _Call(self, name, started)
        managers = aiter(
            tenacity.AsyncRetrying(
                stop=call.stop,
                wait=call.wait,
                retry=call.should_retry,
                sleep=call.async_sleep,
                retry_error_callback=_last_outcome,
            )
        )
        with await anext(managers):
            raise first.error
        # Not `async for`: that would call __aiter__ again, which restarts tenacity's state.
        while True:
            try:
                manager = await anext(managers)
            except StopAsyncIteration:
                return
            yield Attempt(manager.retry_state.attempt_number, self.retryable, manager)

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self.max_attempts!r}, deadline={self.deadline!r}, "
            f"jitter={self.jitter!r}, base={self.base!r}, cap={self.cap!r})"
        )


class Attempts:
    """The attempts of a block of code, from :meth:`Retry.attempts`.

    Iterate with ``for`` in sync code and ``async for`` in async code; each iteration
    yields an :class:`Attempt`, which the block must run under ``with``.
    """

    __slots__ = ("_name", "_policy")

    def __init__(self, policy: Retry, name: str) -> None:
        self._policy = policy
        self._name = name

    def __iter__(self) -> Iterator[Attempt]:
        return self._policy._attempts_sync(self._name)

    def __aiter__(self) -> AsyncIterator[Attempt]:
        return self._policy._attempts_async(self._name)


class Attempt:
    """One attempt of a block: ``with attempt: ...``; ``number`` counts from 1.

    On leaving the ``with``, a retryable exception is swallowed (the loop decides what
    comes next); any other exception propagates.
    """

    __slots__ = ("_manager", "_retryable", "error", "number")

    def __init__(
        self,
        number: int,
        retryable: Callable[[BaseException], bool],
        manager: AttemptManager | None = None,
    ) -> None:
        self.number = number
        self.error: BaseException | None = None
        self._retryable = retryable
        self._manager = manager

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if self._manager is not None:  # a later attempt: tenacity records its outcome
            return bool(self._manager.__exit__(kind, error, traceback))
        if error is None or not self._retryable(error):
            return False
        self.error = error
        return True

    def __repr__(self) -> str:
        return f"<Attempt {self.number}>"


class _Outcome:
    """What the first attempt ended in, kept to hand to tenacity."""

    __slots__ = ("error", "value")

    def __init__(self, error: BaseException | None, value: object) -> None:
        self.error = error
        self.value = value

    def replay(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _Call:
    """One call's retries: the stop, wait, retry and sleep strategies given to tenacity.

    Tenacity asks ``stop`` and ``wait`` about each failed attempt, in an order that
    changed between its versions; both answer from one decision per attempt, made by
    :meth:`_decide`, which is where waits, deadlines and the budget meet.
    """

    __slots__ = ("_decided", "_decision", "_previous", "name", "policy", "started")

    def __init__(self, policy: Retry, name: str, started: float) -> None:
        self.policy = policy
        self.name = name
        self.started = started
        self._previous = policy.base  # decorrelated jitter's first "previous wait"
        self._decided = 0  # the attempt number `_decision` is about
        self._decision: float | None = None

    def should_retry(self, state: RetryCallState) -> bool:
        if state.attempt_number == 1:  # judged before tenacity was entered
            return True
        outcome = state.outcome
        assert outcome is not None
        if outcome.failed:
            error = outcome.exception()
            assert error is not None
            if self.policy.retryable(error):
                return True
            self._emit_gave_up(state.attempt_number, "not_retryable", error)
            return False
        wanted = self.policy.result
        return wanted is not None and wanted(outcome.result())

    def stop(self, state: RetryCallState) -> bool:
        return self._decide(state) is None

    def wait(self, state: RetryCallState) -> float:
        return self._decide(state) or 0.0

    def sleep(self, seconds: float) -> None:
        if waits.enabled:
            (self.policy._sleep or time.sleep)(seconds)

    async def async_sleep(self, seconds: float) -> None:
        if waits.enabled:
            slept = (self.policy._sleep or asyncio.sleep)(seconds)
            if inspect.isawaitable(slept):
                await slept

    def _decide(self, state: RetryCallState) -> float | None:
        """Return the wait before the next attempt, or ``None`` to give up."""
        attempt = state.attempt_number
        if self._decided != attempt:
            self._decided = attempt
            outcome = state.outcome
            assert outcome is not None
            cause = outcome.exception() if outcome.failed else outcome.result()
            self._decision = self._plan(attempt, cause)
        return self._decision

    def _plan(self, attempt: int, cause: object) -> float | None:
        policy = self.policy
        if attempt >= policy.max_attempts:
            self._emit_gave_up(attempt, "attempts", cause)
            return None
        jittered = backoff(
            policy.jitter,
            attempt - 1,
            self._previous,
            base=policy.base,
            cap=policy.cap,
            rng=policy.rng,
        )
        self._previous = jittered
        asked = retry_after_of(cause, policy._time())
        wait = jittered if asked is None or asked < jittered else asked
        if policy.deadline is not None:
            elapsed = policy._monotonic() - self.started
            if elapsed + wait >= policy.deadline:  # no attempt may start at the deadline
                self._emit_gave_up(attempt, "deadline", cause)
                return None
        if policy.budget is not None and not policy.budget.try_withdraw():
            emit(policy.observer, RetryBudgetExhausted("retry", self.name, attempt))
            self._emit_gave_up(attempt, "budget", cause)
            return None
        emit(policy.observer, RetryScheduled("retry", self.name, attempt, wait, cause))
        return wait

    def _emit_gave_up(self, attempts: int, reason: str, cause: object) -> None:
        emit(self.policy.observer, RetryGaveUp("retry", self.name, attempts, reason, cause))


def _last_outcome(state: RetryCallState) -> Any:
    """Give up as if never retried: return the last result, or raise the last exception."""
    assert state.outcome is not None
    return state.outcome.result()


def _name_of(function: Callable[..., Any]) -> str:
    """Name *function* for events: ``module.qualname``, or its class for other callables."""
    qualname = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None) or type(function).__module__
    return f"{module}.{qualname}"


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
