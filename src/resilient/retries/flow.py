"""The decisions of a call's retries, made by tenacity: the sans-I/O core of ``retry``.

This module imports tenacity. :mod:`~resilient.retries.policy` imports it on a policy's
first failure worth retrying, so a call that succeeds at once never pays for tenacity.

tenacity decides as it does for its own ``Retrying``: a policy's :class:`Decider` holds
one ``tenacity.Retrying``, built once, whose strategies are ours (``retry``: is this
outcome worth another attempt; ``stop`` and ``wait``: one plan per attempt, where the
attempts, the jittered wait, ``Retry-After``, the deadline and the budget meet), and its
``iter()`` turns an attempt's outcome into ``DoSleep(wait)`` or an end. One call's
retries are a :class:`CallRetries`: tenacity's ``RetryCallState`` of that call, and what
our strategies remember between its attempts.

The drivers hand :meth:`CallRetries.after` each outcome and do what it answers: wait so
long and try again, or give up and hand back the last outcome. Nothing here sleeps or
calls the function; it reads the clock and the random source, draws on the budget and
tells the observer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol, cast

import tenacity

from resilient.events import RetryBudgetExhausted, RetryGaveUp, RetryScheduled, emit
from resilient.retries.core import backoff, retry_after_of
from resilient.retries.options import RetryOptions

__all__ = ["CallRetries", "Decider", "Outcome"]


class Outcome(Protocol):
    """How an attempt ended: the exception it raised, or else the value it returned."""

    @property
    def error(self) -> BaseException | None:
        """What the attempt raised, or ``None`` when it returned."""

    @property
    def value(self) -> object:
        """What the attempt returned (``None`` when it raised)."""


class Decider:
    """The retry decisions of one policy, as strategies of one ``tenacity.Retrying``.

    Built once per policy, on its first failure worth retrying, and shared by all its
    calls, sync and async: ``Retrying.iter()`` keeps its working state per thread and
    runs without yielding, and each call's own state is its :class:`CallRetries`.
    """

    __slots__ = ("monotonic", "options", "retrying", "rng", "time")

    def __init__(self, options: RetryOptions) -> None:
        self.options = options
        clock = options.clock
        self.monotonic: Callable[[], float] = time.monotonic if clock is None else clock.monotonic
        self.time: Callable[[], float] = time.time if clock is None else clock.time
        self.rng = options.rng or random.Random()  # noqa: S311 (jitter, not cryptography)
        # Its sleep is never called: the drivers wait, sync or async, as `after` says.
        self.retrying = tenacity.Retrying(
            retry=_should_retry, stop=_stop, wait=_wait, retry_error_callback=_give_up
        )

    def start(self, name: str, started: float) -> CallRetries:
        """Begin deciding one call's retries; *started* is when its first attempt began."""
        self.retrying.begin()  # the statistics (per thread) that iter() adds to
        return CallRetries(self, name, started)


class CallRetries(tenacity.RetryCallState):
    """One call's retries: tenacity's state of the call, and what our strategies remember.

    ``attempt_number`` is the attempt the next outcome is about, from 1.
    """

    def __init__(self, decider: Decider, name: str, started: float) -> None:
        super().__init__(decider.retrying, fn=None, args=(), kwargs={})
        self.decider = decider
        self.name = name
        self.started = started
        self.previous = decider.options.base  # decorrelated jitter's first "previous wait"
        self.planned_for = 0  # the attempt `planned` is about
        self.planned: float | None = None

    def after(self, outcome: Outcome) -> float | None:
        """Take the outcome of the current attempt; return the wait before the next one.

        ``None`` means give up: the caller gets this outcome, raised or returned. The
        first outcome was judged worth retrying before the call reached us.
        """
        error = outcome.error
        if error is None:
            self.set_result(outcome.value)
        else:
            self.set_exception((type(error), error, error.__traceback__))
        traceback = None if error is None else error.__traceback__
        try:
            action = self.decider.retrying.iter(self)
        except BaseException as raised:
            if raised is not error:
                raise
            # tenacity hands back an error it does not retry by raising it; the driver
            # raises it to the caller, with no frames of tenacity's.
            raised.with_traceback(traceback)
            return None
        if not isinstance(action, tenacity.DoSleep):
            return None  # stopped, or a result that is not retried
        self.prepare_for_next_attempt()
        return float(action)

    def should_retry(self) -> bool:
        """Whether the current outcome is worth another attempt (attempts left permitting)."""
        if self.attempt_number == 1:  # judged before retrying began
            return True
        outcome = cast("tenacity.Future", self.outcome)  # asked after an outcome only
        options = self.decider.options
        if outcome.failed:
            error = cast("BaseException", outcome.exception())  # a failed outcome's
            if options.retryable(error):
                return True
            self._gave_up("not_retryable", error)
            return False
        return options.result is not None and bool(options.result(outcome.result()))

    def plan(self) -> float | None:
        """Return the wait before the next attempt, or ``None`` to give up.

        One plan an attempt: tenacity asks ``stop`` and ``wait`` about each outcome, in an
        order that changed between its versions, and both answer from it.
        """
        attempt = self.attempt_number
        if self.planned_for != attempt:
            outcome = cast("tenacity.Future", self.outcome)  # planned after an outcome only
            self.planned_for = attempt
            self.planned = self._plan(outcome.exception() if outcome.failed else outcome.result())
        return self.planned

    def _plan(self, cause: object) -> float | None:
        decider, attempt = self.decider, self.attempt_number
        options = decider.options
        if attempt >= options.attempts:
            self._gave_up("attempts", cause)
            return None
        jittered = backoff(
            options.jitter,
            attempt - 1,
            self.previous,
            base=options.base,
            cap=options.cap,
            rng=decider.rng,
        )
        self.previous = jittered
        asked = retry_after_of(cause, decider.time())
        wait = jittered if asked is None or asked < jittered else asked
        if options.deadline is not None:
            elapsed = decider.monotonic() - self.started
            if elapsed + wait >= options.deadline:  # no attempt may start at the deadline
                self._gave_up("deadline", cause)
                return None
        if options.budget is not None and not options.budget.try_withdraw():
            emit(options.observer, RetryBudgetExhausted("retry", self.name, attempt))
            self._gave_up("budget", cause)
            return None
        emit(options.observer, RetryScheduled("retry", self.name, attempt, wait, cause))
        return wait

    def _gave_up(self, reason: str, cause: object) -> None:
        event = RetryGaveUp("retry", self.name, self.attempt_number, reason, cause)
        emit(self.decider.options.observer, event)


# tenacity's strategies: small functions of the call's state, as its own are.


def _call(state: tenacity.RetryCallState) -> CallRetries:
    return cast("CallRetries", state)  # tenacity passes the state it was given


def _should_retry(state: tenacity.RetryCallState) -> bool:
    return _call(state).should_retry()


def _stop(state: tenacity.RetryCallState) -> bool:
    return _call(state).plan() is None


def _wait(state: tenacity.RetryCallState) -> float:
    return _call(state).plan() or 0.0


def _give_up(state: tenacity.RetryCallState) -> None:
    """When ``stop`` says stop: nothing to raise, the driver hands back the last outcome."""
