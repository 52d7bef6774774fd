"""Helpers for the retry tests: sleeps that move a FakeClock, an event recorder, and the
``driver`` fixture, which runs each behaviour test through the sync and the async drivers.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import pytest

from resilient.retries import Attempt, Attempts, Retry
from resilient.testing import FakeClock

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Sleeper:
    """A sync sleep that records each wait and advances *clock* by it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


class AsyncSleeper(Sleeper):
    """The async twin of :class:`Sleeper`."""

    async def __call__(self, seconds: float) -> None:  # type: ignore[override]
        super().__call__(seconds)


class Driver:
    """Runs a policy through its sync driver (``def``, ``for``) or its async one.

    ``sleep`` records the waits and advances the clock: a sync sleep for the sync driver,
    an async one for the async driver.
    """

    def __init__(self, kind: str, clock: FakeClock) -> None:
        self.kind = kind
        self.sleep = Sleeper(clock) if kind == "sync" else AsyncSleeper(clock)

    def decorate(self, policy: Retry, function: Callable[_P, _T]) -> Callable[_P, _T]:
        """Return *function* retried by *policy*, as a ``def`` or as an ``async def``.

        The async one runs *function* as its body, and each call runs on a new event loop.
        """
        if self.kind == "sync":
            return policy(function)

        @functools.wraps(function)
        async def body(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return function(*args, **kwargs)

        retried = policy(body)

        @functools.wraps(function)
        def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return asyncio.run(retried(*args, **kwargs))

        return call

    def block(self, attempts: Attempts, body: Callable[[Attempt], Any]) -> Attempt:
        """Run *body* under each attempt, with ``for`` or ``async for``; return the last."""
        if self.kind == "sync":
            for attempt in attempts:
                with attempt:
                    body(attempt)
            return attempt

        async def run() -> Attempt:
            async for attempt in attempts:
                with attempt:
                    body(attempt)
            return attempt

        return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def driver(request: pytest.FixtureRequest, clock: FakeClock) -> Driver:
    return Driver(request.param, clock)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_700_000_000.0)


@pytest.fixture
def sleeper(clock: FakeClock) -> Sleeper:
    return Sleeper(clock)


@pytest.fixture
def async_sleeper(clock: FakeClock) -> AsyncSleeper:
    return AsyncSleeper(clock)
