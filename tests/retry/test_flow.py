"""One core for every driver: tenacity decides, once set up per policy, for every caller."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import tenacity

from resilient import retry
from resilient.events import RetryScheduled
from resilient.retries import Attempt
from resilient.testing import FakeClock, RecordingObserver
from tests.retry.conftest import Driver


class Flaky:
    """Fails with ConnectionError *failures* times, then returns how many calls it took."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(self.calls)
        return self.calls


def test_tenacity_is_set_up_once_per_policy(
    monkeypatch: pytest.MonkeyPatch, driver: Driver
) -> None:
    made: list[tenacity.Retrying] = []
    setup = tenacity.Retrying.__init__

    def counted(self: tenacity.Retrying, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        setup(self, *args, **kwargs)

    monkeypatch.setattr(tenacity.Retrying, "__init__", counted)
    policy = retry(attempts=3, sleep=driver.sleep)
    for _ in range(3):
        assert driver.decorate(policy, Flaky(2))() == 3

    def block(attempt: Attempt) -> None:
        if attempt.number < 3:
            raise ConnectionError(attempt.number)

    for _ in range(2):
        assert driver.block(policy.attempts(), block).number == 3
    assert len(made) == 1
    assert driver.decorate(policy.narrowed(on=OSError), Flaky(1))() == 2
    assert len(made) == 2  # a narrowed copy is another policy


def test_threads_share_a_policy_and_each_call_keeps_its_own_count(
    recorder: RecordingObserver,
) -> None:
    clock = FakeClock()
    policy = retry(attempts=3, base=0.01, cap=0.01, sleep=lambda _: None, clock=clock)
    watched = retry(attempts=3, sleep=lambda _: None, observer=recorder, name="watched")

    def work(_: int) -> list[int]:
        mine = [policy(Flaky(failures))() for failures in (0, 1, 2) * 30]
        return [*mine, watched(Flaky(2))()]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [made for mine in pool.map(work, range(8)) for made in mine]
    assert sorted(results) == sorted([1, 2, 3] * 30 * 8 + [3] * 8)
    assert [e.attempt for e in recorder.of(RetryScheduled)].count(1) == 8
    assert [e.attempt for e in recorder.of(RetryScheduled)].count(2) == 8


async def test_tasks_share_a_policy_and_each_call_keeps_its_own_attempts(
    recorder: RecordingObserver,
) -> None:
    async def pause(seconds: float) -> None:
        await asyncio.sleep(0)  # let the other calls take their turn between attempts

    policy = retry(attempts=4, jitter="decorrelated", sleep=pause, observer=recorder)

    async def call(failures: int) -> tuple[int, int]:
        attempts = 0

        @policy
        async def flaky() -> int:
            nonlocal attempts
            attempts += 1
            await asyncio.sleep(0)
            if attempts <= failures:
                raise ConnectionError(attempts)
            return attempts

        return failures, await flaky()

    done = await asyncio.gather(*(call(n % 4) for n in range(40)))
    assert all(made == failures + 1 for failures, made in done)
    scheduled = recorder.of(RetryScheduled)
    assert len(scheduled) == sum(n % 4 for n in range(40))
    assert all(0.1 <= e.wait <= 10.0 for e in scheduled)
