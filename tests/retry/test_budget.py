"""``RetryBudget``: deposits, withdrawals, the reserve, expiry, threads, and ``retry(budget=)``."""

from __future__ import annotations

import threading

import pytest

from resilient import ConfigurationError, RetryBudget, retry
from resilient.events import RetryBudgetExhausted, RetryGaveUp
from resilient.retries import Attempt
from resilient.testing import FakeClock, RecordingObserver
from tests.retry.conftest import Driver


def test_every_call_deposits_the_ratio_and_every_retry_withdraws_one(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=clock)
    assert budget.balance == 0.0
    assert not budget.try_withdraw()
    for _ in range(5):
        budget.deposit()
    assert budget.balance == 1.0  # exactly: tokens are counted in integers
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    for _ in range(1000):
        budget.deposit()
    assert budget.balance == 200.0


def test_the_reserve_allows_min_per_second_retries_over_the_window(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=2, window=5.0, clock=clock)
    assert budget.balance == 10.0
    assert [budget.try_withdraw() for _ in range(11)] == [True] * 10 + [False]
    clock.advance(5.0)  # the withdrawals have expired: the reserve is whole again
    assert budget.balance == 10.0


def test_deposits_expire_after_the_window(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, window=10.0, clock=clock)
    budget.deposit()
    clock.advance(4.0)
    budget.deposit()
    clock.advance(5.9)
    assert budget.balance == 2.0
    clock.advance(0.1)  # 10 s after the first deposit
    assert budget.balance == 1.0
    clock.advance(4.0)
    assert budget.balance == 0.0


def test_slices_are_reused_as_time_moves_on(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, window=1.0, clock=clock)
    for _ in range(1000):  # a hundred windows, ten slices each: memory stays the same
        budget.deposit()
        clock.advance(0.1)
    assert budget.balance == 9.0


def test_threads_deposit_and_withdraw_exactly(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10, window=10.0, clock=clock)
    withdrawn: list[bool] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(1000):
            budget.deposit()
        mine = [budget.try_withdraw() for _ in range(200)]
        with lock:
            withdrawn.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 8000 calls * 0.2 + a reserve of 100; 1600 withdrawals asked for, all granted.
    assert sum(withdrawn) == 1600
    assert budget.balance == 100.0

    def drain() -> None:
        mine = [budget.try_withdraw() for _ in range(50)]
        with lock:
            withdrawn.extend(mine)

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(withdrawn) == 1600 + 100  # never more than the balance
    assert budget.balance == 0.0


def test_retry_stops_when_the_budget_is_empty(
    clock: FakeClock, driver: Driver, recorder: RecordingObserver
) -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0, clock=clock)
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError

    policy = retry(attempts=3, budget=budget, sleep=driver.sleep, observer=recorder)
    always_down = driver.decorate(policy, down)
    for _ in range(100):
        with pytest.raises(ConnectionError):
            always_down()
    # Every tenth call has saved up one retry; that retry fails and finds the budget empty.
    assert calls == 110
    assert len(driver.sleep.waits) == 10
    assert len(recorder.of(RetryBudgetExhausted)) == 100
    assert {e.reason for e in recorder.of(RetryGaveUp)} == {"budget"}


def test_successful_calls_fill_the_budget_for_later_retries(
    clock: FakeClock, driver: Driver
) -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=clock)
    failing = False

    def work() -> str:
        if failing:
            raise ConnectionError
        return "ok"

    call = driver.decorate(retry(attempts=2, budget=budget, sleep=driver.sleep), work)

    for _ in range(4):
        assert call() == "ok"
    assert budget.balance == 2.0
    failing = True
    for _ in range(3):
        with pytest.raises(ConnectionError):
            call()
    # 2.0 + 3 * 0.5 deposited; three retries withdrawn.
    assert budget.balance == 0.5
    assert len(driver.sleep.waits) == 3


def test_the_reserve_alone_allows_a_retry(clock: FakeClock, driver: Driver) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0, clock=clock)

    def fail() -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        driver.decorate(retry(attempts=5, budget=budget, sleep=driver.sleep), fail)()
    assert budget.balance == 0.0
    assert len(driver.sleep.waits) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": -0.1}, "ratio must be between 0 and 1000"),
        ({"ratio": "0.2"}, "ratio must be a number"),
        ({"min_per_second": -1}, "min_per_second must be a finite number >= 0"),
        ({"min_per_second": None}, "min_per_second must be a number"),
        ({"window": 0}, "window must be a finite number of seconds > 0"),
    ],
)
def test_bad_budgets_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RetryBudget(**options)  # type: ignore[arg-type]


def test_repr() -> None:
    assert repr(RetryBudget()) == "RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0)"


class Failing:
    """A block that always fails, counting its runs."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, attempt: Attempt) -> None:
        self.runs += 1
        raise ConnectionError


def test_blocks_deposit_and_withdraw_too(clock: FakeClock, driver: Driver) -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=clock)
    for _ in range(2):
        driver.block(retry(budget=budget, sleep=driver.sleep).attempts(), lambda a: None)
    assert budget.balance == 1.0
    failing = Failing()
    with pytest.raises(ConnectionError):
        driver.block(retry(attempts=5, budget=budget, sleep=driver.sleep).attempts(), failing)
    assert failing.runs == 2  # 1.5 tokens: one retry, then the budget is empty


def test_a_block_deposits_before_it_withdraws(clock: FakeClock, driver: Driver) -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, clock=clock)
    failing = Failing()
    with pytest.raises(ConnectionError):
        driver.block(retry(attempts=5, budget=budget, sleep=driver.sleep).attempts(), failing)
    assert failing.runs == 2
    assert budget.balance == 0.0
