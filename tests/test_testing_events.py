"""RecordingObserver: the events a real block emits, kept in order for a test to read."""

from __future__ import annotations

import doctest
import threading

import pytest

from resilient import CircuitBreaker, CircuitOpenError, RateLimiter, SlidingWindow
from resilient.events import (
    BreakerStateChanged,
    CallFailed,
    CallRejected,
    Event,
    Observer,
    RateLimited,
    observe_all,
)
from resilient.testing import FakeClock, RecordingObserver


class Boom(Exception):
    pass


def fail() -> None:
    raise Boom("down")


def test_it_keeps_what_a_breaker_emits_in_order() -> None:
    events = RecordingObserver()
    breaker = CircuitBreaker(
        "payments", minimum_calls=2, window=2, open_for=10.0, clock=FakeClock(), observer=events
    )
    guarded = breaker(fail)
    for _ in range(2):
        with pytest.raises(Boom):
            guarded()
    with pytest.raises(CircuitOpenError):
        guarded()
    assert [type(event) for event in events.events] == [
        CallFailed,
        CallFailed,
        BreakerStateChanged,
        CallRejected,
    ]
    (opened,) = events.of(BreakerStateChanged)
    assert (opened.name, opened.old, opened.new) == ("payments", "closed", "open")
    assert [str(failed.error) for failed in events.of(CallFailed)] == ["down", "down"]
    assert events.of(RateLimited) == []
    assert events.of(Event) == events.events  # every event is an Event


async def test_it_records_beside_another_observer_and_forgets_on_clear() -> None:
    events, other = RecordingObserver(), RecordingObserver()
    limiter = RateLimiter(clock=FakeClock(), observer=observe_all(events, other))
    policy = SlidingWindow("1/minute")
    assert (await limiter.hit("user:42", policy)).allowed
    assert not (await limiter.hit("user:42", policy)).allowed
    (denied,) = events.of(RateLimited)
    assert denied.key == "user:42"
    assert other.events == events.events
    events.clear()
    assert events.events == []
    assert len(other.events) == 1
    assert repr(events) == "RecordingObserver(0 events)"
    assert repr(other) == "RecordingObserver(1 events)"


def test_threads_lose_no_event() -> None:
    events = RecordingObserver()
    sent = [
        CallRejected(block="breaker", name=f"b{thread}", retry_after=float(n))
        for thread in range(8)
        for n in range(500)
    ]

    def send(part: list[CallRejected]) -> None:
        for event in part:
            events(event)

    threads = [threading.Thread(target=send, args=(sent[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(events.events) == len(sent)
    assert set(events.events) == set(sent)


def test_it_is_an_observer() -> None:
    observer: Observer = RecordingObserver()  # mypy checks the protocol
    observer(CallRejected(block="breaker", name="b", retry_after=1.0))
    assert isinstance(observer, RecordingObserver)
    assert len(observer.events) == 1


def test_its_docstring_example_runs() -> None:
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(RecordingObserver):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0
