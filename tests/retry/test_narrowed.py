"""A narrowed policy: what a library narrows its user's policy to (the httpx transport)."""

from __future__ import annotations

from resilient import retry
from resilient.testing import FakeClock
from tests.retry.conftest import Driver


def test_a_narrowed_policy_retries_only_what_both_allow(clock: FakeClock, driver: Driver) -> None:
    policy = retry(attempts=3, on=(KeyError, ValueError), clock=clock, sleep=driver.sleep)
    narrowed = policy.narrowed(on=KeyError, name="narrow")
    assert narrowed.retryable(KeyError("k"))
    assert not narrowed.retryable(ValueError("v"))  # the narrowing refuses it
    assert not narrowed.retryable(TypeError("t"))  # the policy refuses it
    assert policy.retryable(ValueError("v"))  # the original is unchanged
    assert narrowed.name == "narrow"
    assert policy.name is None

    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise KeyError("again")
        return len(calls)

    assert driver.decorate(narrowed, flaky)() == 3
    assert len(driver.sleep.waits) == 2  # the narrowed copy keeps the policy's sleep


def test_results_are_retried_only_when_both_predicates_say_so(
    clock: FakeClock, driver: Driver
) -> None:
    policy = retry(attempts=4, result=lambda r: r < 10, clock=clock, sleep=driver.sleep)
    narrowed = policy.narrowed(result=lambda r: r % 2 == 1)
    values = iter([1, 3, 4, 5])

    def next_value() -> int:
        return next(values)

    assert (
        driver.decorate(narrowed, next_value)() == 4
    )  # 1 and 3 are retried; 4 is even, so the narrowing stops it
    assert retry(attempts=2).narrowed(result=lambda r: r is None).options.result is not None
