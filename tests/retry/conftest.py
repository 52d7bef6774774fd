"""Helpers for the retry tests: a sleep that moves a FakeClock, and an event recorder."""

from __future__ import annotations

import pytest

from resilient.events import Event
from resilient.testing import FakeClock


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


class Recorder:
    """An observer that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event, /) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_700_000_000.0)


@pytest.fixture
def sleeper(clock: FakeClock) -> Sleeper:
    return Sleeper(clock)


@pytest.fixture
def async_sleeper(clock: FakeClock) -> AsyncSleeper:
    return AsyncSleeper(clock)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
