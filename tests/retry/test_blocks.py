"""The block form: ``for attempt in retry().attempts(): with attempt: ...``, and async.

Each behaviour is tested through both drivers (``for`` and ``async for``).
"""

from __future__ import annotations

import random

import pytest

from resilient import ConfigurationError, retry
from resilient.events import RetryGaveUp, RetryScheduled
from resilient.retries import Attempt
from resilient.testing import FakeClock, RecordingObserver
from tests.retry.conftest import Driver


def test_a_block_that_succeeds_runs_once(driver: Driver) -> None:
    runs: list[int] = []
    last = driver.block(retry(sleep=driver.sleep).attempts(), lambda a: runs.append(a.number))
    assert runs == [1]
    assert driver.sleep.waits == []
    assert repr(last) == "<Attempt 1>"


def test_a_failing_block_is_run_again_until_it_succeeds(
    driver: Driver, recorder: RecordingObserver
) -> None:
    runs: list[int] = []

    def body(attempt: Attempt) -> None:
        runs.append(attempt.number)
        if len(runs) < 3:
            raise OSError(len(runs))

    policy = retry(
        attempts=5, sleep=driver.sleep, rng=random.Random(1), observer=recorder, name="load"
    )
    driver.block(policy.attempts(), body)
    assert runs == [1, 2, 3]
    expected = random.Random(1)
    assert driver.sleep.waits == [expected.uniform(0, 0.1), expected.uniform(0, 0.2)]
    assert [(e.name, e.attempt) for e in recorder.of(RetryScheduled)] == [
        ("load", 1),
        ("load", 2),
    ]


def test_a_block_runs_every_attempt_it_is_given(clock: FakeClock, driver: Driver) -> None:
    runs: list[int] = []

    def body(attempt: Attempt) -> None:
        runs.append(attempt.number)
        if len(runs) < 4:
            raise ConnectionError

    driver.block(retry(attempts=4, sleep=driver.sleep, clock=clock).attempts(), body)
    assert runs == [1, 2, 3, 4]
    assert len(driver.sleep.waits) == 3

    runs.clear()

    def failing(attempt: Attempt) -> None:
        runs.append(attempt.number)
        raise ConnectionError

    with pytest.raises(ConnectionError):
        driver.block(retry(attempts=2, sleep=driver.sleep).attempts(), failing)
    assert runs == [1, 2]


def test_a_block_gives_up_with_the_last_exception(
    driver: Driver, recorder: RecordingObserver
) -> None:
    runs = 0

    def body(attempt: Attempt) -> None:
        nonlocal runs
        runs += 1
        raise OSError(runs)

    policy = retry(attempts=3, sleep=driver.sleep, observer=recorder)
    with pytest.raises(OSError, match="3"):
        driver.block(policy.attempts(), body)
    assert runs == 3
    assert [e.reason for e in recorder.of(RetryGaveUp)] == ["attempts"]


def test_a_block_does_not_retry_what_on_excludes(driver: Driver) -> None:
    runs = 0

    def first(attempt: Attempt) -> None:
        nonlocal runs
        runs += 1
        raise KeyError("first")

    with pytest.raises(KeyError):
        driver.block(retry(on=OSError, sleep=driver.sleep).attempts(), first)
    assert runs == 1

    def second(attempt: Attempt) -> None:
        nonlocal runs
        runs += 1
        raise OSError if attempt.number == 1 else KeyError("second")

    with pytest.raises(KeyError):
        driver.block(retry(on=OSError, sleep=driver.sleep).attempts(), second)
    assert runs == 3


def test_a_block_honours_the_deadline(clock: FakeClock, driver: Driver) -> None:
    runs = 0

    def body(attempt: Attempt) -> None:
        nonlocal runs
        runs += 1
        clock.advance(0.3)
        raise TimeoutError

    policy = retry(
        attempts=100,
        deadline=1.0,
        base=0.2,
        cap=0.2,
        jitter="equal",
        sleep=driver.sleep,
        clock=clock,
    )
    with pytest.raises(TimeoutError):
        driver.block(policy.attempts(), body)
    assert clock.monotonic() < 1.0 + 0.3
    assert all(0.1 <= w <= 0.2 for w in driver.sleep.waits)
    assert runs == len(driver.sleep.waits) + 1


def test_a_block_cannot_have_a_result_predicate() -> None:
    with pytest.raises(ConfigurationError, match="result="):
        retry(result=lambda r: r is None).attempts()


def test_a_sync_block_needs_a_sync_sleep(clock: FakeClock) -> None:
    with pytest.raises(ConfigurationError, match="sleep must be too"):  # noqa: PT012
        for attempt in retry(sleep=clock.sleep).attempts():
            with attempt:
                pass
