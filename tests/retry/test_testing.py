"""The testing switch, and what a successful call costs: tenacity stays unimported."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from resilient import retry
from resilient.events import RetryGaveUp, RetryScheduled
from resilient.retries.core import waits
from resilient.testing import FakeClock, RecordingObserver, retries_without_waits, set_retry_waits
from tests.retry.conftest import Driver


def always_failing(counter: list[int]) -> None:
    counter.append(1)
    raise ConnectionError(len(counter))


def test_without_waits_retries_run_but_never_sleep(
    driver: Driver, recorder: RecordingObserver
) -> None:
    calls: list[int] = []
    policy = retry(attempts=4, base=5.0, cap=60.0, sleep=driver.sleep, observer=recorder)
    flaky = driver.decorate(policy, always_failing)
    with retries_without_waits(), pytest.raises(ConnectionError):
        flaky(calls)
    assert len(calls) == 4
    assert driver.sleep.waits == []
    # The decisions are those of production: the events still carry the waits skipped.
    assert [e.attempt for e in recorder.of(RetryScheduled)] == [1, 2, 3]
    assert all(0 <= e.wait <= 60.0 for e in recorder.of(RetryScheduled))
    assert waits.enabled  # restored


def test_without_waits_retries_end_as_they_would_with_them(driver: Driver) -> None:
    calls = 0

    def fetch() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError
        return calls

    with retries_without_waits():
        assert driver.decorate(retry(attempts=3, base=5.0, sleep=driver.sleep), fetch)() == 3
    assert driver.sleep.waits == []


def test_without_waits_a_retry_after_past_the_deadline_still_gives_up(
    clock: FakeClock, driver: Driver, recorder: RecordingObserver
) -> None:
    def get() -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "30"})

    policy = retry(
        deadline=1.0, result=lambda r: r.status_code == 429, clock=clock, observer=recorder
    )
    with retries_without_waits():
        assert driver.decorate(policy, get)().status_code == 429
    assert [e.reason for e in recorder.of(RetryGaveUp)] == ["deadline"]


def test_the_function_form_and_nesting(driver: Driver) -> None:
    calls: list[int] = []
    sleeper = driver.sleep
    flaky = driver.decorate(retry(attempts=2, sleep=sleeper), always_failing)
    set_retry_waits(False)
    try:
        with retries_without_waits():
            pass
        assert not waits.enabled  # the context manager restores what it found
        with pytest.raises(ConnectionError):
            flaky(calls)
        assert sleeper.waits == []
    finally:
        set_retry_waits(True)
    with pytest.raises(ConnectionError):
        flaky(calls)
    assert len(sleeper.waits) == 1


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_successful_calls_never_import_tenacity() -> None:
    code = """
import asyncio, sys
import resilient
from resilient import RetryBudget, retry

@retry(attempts=3, deadline=5, budget=RetryBudget())
def ok(x):
    return x

@retry(on=ValueError)
def wrong():
    raise KeyError("not retried")

@retry()
async def aok():
    return 2

async def blocks():
    async for attempt in retry().attempts():
        with attempt:
            pass

assert ok(1) == 1 and asyncio.run(aok()) == 2
for attempt in retry().attempts():
    with attempt:
        pass
asyncio.run(blocks())
try:
    wrong()
except KeyError:
    pass
print("tenacity" in sys.modules)

from resilient.testing import retries_without_waits
calls = []

@retry()
def flaky():
    calls.append(1)
    if len(calls) == 1:
        raise ConnectionError
    return "ok"

with retries_without_waits():
    flaky()
print("tenacity" in sys.modules)
"""
    assert run_python(code).split() == ["False", "True"]
