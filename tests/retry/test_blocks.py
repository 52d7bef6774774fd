"""The block form: ``for attempt in retry().attempts(): with attempt: ...``, and async."""

from __future__ import annotations

import random

import pytest

from resilient import ConfigurationError, retry
from resilient.events import RetryGaveUp, RetryScheduled
from resilient.testing import FakeClock
from tests.retry.conftest import AsyncSleeper, Recorder, Sleeper


def test_a_block_that_succeeds_runs_once(sleeper: Sleeper) -> None:
    runs = []
    for attempt in retry(sleep=sleeper).attempts():
        with attempt:
            runs.append(attempt.number)
    assert runs == [1]
    assert sleeper.waits == []


def test_a_failing_block_is_run_again_until_it_succeeds(
    sleeper: Sleeper, recorder: Recorder
) -> None:
    runs = []
    policy = retry(attempts=5, sleep=sleeper, rng=random.Random(1), observer=recorder, name="load")
    for attempt in policy.attempts():
        with attempt:
            runs.append(attempt.number)
            if len(runs) < 3:
                raise OSError(len(runs))
    assert runs == [1, 2, 3]
    expected = random.Random(1)
    assert sleeper.waits == [expected.uniform(0, 0.1), expected.uniform(0, 0.2)]
    assert [(e.name, e.attempt) for e in recorder.of(RetryScheduled)] == [  # type: ignore[attr-defined]
        ("load", 1),
        ("load", 2),
    ]


def test_a_block_gives_up_with_the_last_exception(sleeper: Sleeper, recorder: Recorder) -> None:
    runs = 0
    with pytest.raises(OSError, match="3"):  # noqa: PT012 (the loop is the code under test)
        for attempt in retry(attempts=3, sleep=sleeper, observer=recorder).attempts():
            with attempt:
                runs += 1
                raise OSError(runs)
    assert runs == 3
    assert [e.reason for e in recorder.of(RetryGaveUp)] == ["attempts"]  # type: ignore[attr-defined]


def test_a_block_does_not_retry_what_on_excludes(sleeper: Sleeper) -> None:
    runs = 0
    with pytest.raises(KeyError):  # noqa: PT012
        for attempt in retry(on=OSError, sleep=sleeper).attempts():
            with attempt:
                runs += 1
                raise KeyError("first")
    assert runs == 1
    with pytest.raises(KeyError):  # noqa: PT012
        for attempt in retry(on=OSError, sleep=sleeper).attempts():
            with attempt:
                runs += 1
                raise OSError if attempt.number == 1 else KeyError("second")
    assert runs == 3


def test_a_block_honours_the_deadline(clock: FakeClock, sleeper: Sleeper) -> None:
    runs = 0
    with pytest.raises(TimeoutError):  # noqa: PT012
        for attempt in retry(
            attempts=100,
            deadline=1.0,
            base=0.2,
            cap=0.2,
            jitter="equal",
            sleep=sleeper,
            clock=clock,
        ).attempts():
            with attempt:
                runs += 1
                clock.advance(0.3)
                raise TimeoutError
    assert clock.monotonic() < 1.0 + 0.3
    assert all(0.1 <= w <= 0.2 for w in sleeper.waits)
    assert runs == len(sleeper.waits) + 1


async def test_async_blocks(clock: FakeClock, async_sleeper: AsyncSleeper) -> None:
    runs = []
    async for attempt in retry(attempts=4, sleep=async_sleeper, clock=clock).attempts():
        with attempt:
            runs.append(attempt.number)
            if len(runs) < 4:
                raise ConnectionError
    assert runs == [1, 2, 3, 4]
    assert len(async_sleeper.waits) == 3

    runs.clear()
    with pytest.raises(ConnectionError):  # noqa: PT012
        async for attempt in retry(attempts=2, sleep=async_sleeper).attempts():
            with attempt:
                runs.append(attempt.number)
                raise ConnectionError
    assert runs == [1, 2]


async def test_an_async_block_that_succeeds_at_once(async_sleeper: AsyncSleeper) -> None:
    runs = 0
    async for attempt in retry(sleep=async_sleeper).attempts():
        with attempt:
            runs += 1
    assert runs == 1
    assert repr(attempt) == "<Attempt 1>"


def test_a_block_cannot_have_a_result_predicate() -> None:
    with pytest.raises(ConfigurationError, match="result="):
        retry(result=lambda r: r is None).attempts()


def test_a_sync_block_needs_a_sync_sleep(clock: FakeClock) -> None:
    with pytest.raises(ConfigurationError, match="sleep must be too"):  # noqa: PT012
        for attempt in retry(sleep=clock.sleep).attempts():
            with attempt:
                pass
