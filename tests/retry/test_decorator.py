"""``@retry`` on ``def`` and ``async def``: what is retried, how long it waits, when it stops.

Each behaviour is tested through both drivers (the ``driver`` fixture); the tests named
for ``async def`` are about what only a coroutine does.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import traceback

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient import (
    BackendUnavailable,
    CircuitOpenError,
    ConfigurationError,
    retry,
)
from resilient.events import Event, RetryGaveUp, RetryScheduled
from resilient.retries.core import JITTERS, Jitter, backoff
from resilient.testing import FakeClock, RecordingObserver
from tests.retry.conftest import AsyncSleeper, Driver, Sleeper


class Flaky:
    """Fails with *errors* in turn, then returns *value*; counts its calls."""

    def __init__(self, *errors: BaseException, value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def test_a_success_is_returned_at_once(driver: Driver, recorder: RecordingObserver) -> None:
    flaky = Flaky()
    fetch = driver.decorate(retry(sleep=driver.sleep, observer=recorder), flaky)
    assert fetch() == "ok"
    assert flaky.calls == 1
    assert driver.sleep.waits == []
    assert recorder.events == []


def test_failures_are_retried_with_full_jitter_from_the_given_rng(
    clock: FakeClock, driver: Driver, recorder: RecordingObserver
) -> None:
    sleeper = driver.sleep
    flaky = Flaky(ConnectionError("1"), ConnectionError("2"), ConnectionError("3"))
    policy = retry(
        attempts=4,
        base=0.5,
        cap=1.5,
        clock=clock,
        sleep=sleeper,
        rng=random.Random(42),
        observer=recorder,
    )
    fetch = driver.decorate(policy, flaky)
    assert fetch() == "ok"
    assert flaky.calls == 4
    expected = random.Random(42)
    assert sleeper.waits == [
        expected.uniform(0, 0.5),
        expected.uniform(0, 1.0),
        expected.uniform(0, 1.5),  # capped
    ]
    scheduled = recorder.of(RetryScheduled)
    assert [(e.attempt, e.wait, str(e.cause)) for e in scheduled] == [
        (1, sleeper.waits[0], "1"),
        (2, sleeper.waits[1], "2"),
        (3, sleeper.waits[2], "3"),
    ]
    assert recorder.of(RetryGaveUp) == []


@pytest.mark.parametrize("jitter", JITTERS)
def test_each_jitter_gives_the_waits_of_its_formula(jitter: Jitter, driver: Driver) -> None:
    sleeper = driver.sleep
    flaky = Flaky(*(OSError() for _ in range(6)))
    policy = retry(
        attempts=7, jitter=jitter, base=0.2, cap=3.0, sleep=sleeper, rng=random.Random(5)
    )
    driver.decorate(policy, flaky)()
    rng, previous, expected = random.Random(5), 0.2, []
    for n in range(6):
        previous = backoff(jitter, n, previous, base=0.2, cap=3.0, rng=rng)
        expected.append(previous)
    assert sleeper.waits == expected


def test_when_attempts_run_out_the_last_exception_is_raised_with_its_traceback(
    driver: Driver, recorder: RecordingObserver
) -> None:
    calls = 0

    def connect() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError(f"attempt {calls}")

    retried = driver.decorate(retry(attempts=3, sleep=driver.sleep, observer=recorder), connect)
    with pytest.raises(ConnectionRefusedError, match="attempt 3") as raised:
        retried()
    assert calls == 3
    assert len(driver.sleep.waits) == 2
    frames = traceback.extract_tb(raised.value.__traceback__)
    assert frames[-1].name == "connect"
    assert frames[-1].line == 'raise ConnectionRefusedError(f"attempt {calls}")'
    assert raised.value.__context__ is None  # not chained to the earlier attempts
    assert not any("tenacity" in frame.filename for frame in frames)
    (gave_up,) = recorder.of(RetryGaveUp)
    assert (gave_up.attempts, gave_up.reason, gave_up.cause) == (3, "attempts", raised.value)
    assert gave_up.name.endswith("connect")


def test_one_attempt_means_no_retry(driver: Driver) -> None:
    flaky = Flaky(OSError("once"))
    with pytest.raises(OSError, match="once"):
        driver.decorate(retry(attempts=1, sleep=driver.sleep), flaky)()
    assert flaky.calls == 1


def test_only_the_exceptions_named_by_on_are_retried(
    driver: Driver, recorder: RecordingObserver
) -> None:
    flaky = Flaky(ConnectionError(), ValueError("bad input"))
    guarded = driver.decorate(
        retry(on=ConnectionError, sleep=driver.sleep, observer=recorder), flaky
    )
    with pytest.raises(ValueError, match="bad input") as raised:
        guarded()
    assert flaky.calls == 2
    assert [e.reason for e in recorder.of(RetryGaveUp)] == ["not_retryable"]
    frames = traceback.extract_tb(raised.value.__traceback__)
    assert not any("tenacity" in frame.filename for frame in frames)

    first_time = Flaky(ValueError("at once"))
    with pytest.raises(ValueError, match="at once"):
        driver.decorate(retry(on=(ConnectionError, TimeoutError), sleep=driver.sleep), first_time)()
    assert first_time.calls == 1


def test_on_may_be_a_predicate(driver: Driver) -> None:
    def transient(error: Exception) -> bool:
        return isinstance(error, OSError) and error.errno == 111

    flaky = Flaky(OSError(111, "refused"), OSError(2, "no such file"))
    with pytest.raises(OSError, match="no such file"):
        driver.decorate(retry(on=transient, sleep=driver.sleep), flaky)()
    assert flaky.calls == 2


def test_on_nothing_retries_results_only(driver: Driver) -> None:
    flaky = Flaky(OSError("not retried"))
    with pytest.raises(OSError, match="not retried"):
        driver.decorate(retry(on=(), result=lambda r: r is None, sleep=driver.sleep), flaky)()
    assert flaky.calls == 1


@pytest.mark.parametrize(
    "error",
    [
        ConfigurationError("bad option"),  # a ValueError, caught by on=ValueError otherwise
        KeyboardInterrupt(),
        SystemExit(1),
    ],
)
def test_some_errors_are_never_retried(error: BaseException, driver: Driver) -> None:
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        driver.decorate(retry(on=ValueError, sleep=driver.sleep), flaky)()
    with pytest.raises(type(error)):
        driver.decorate(retry(sleep=driver.sleep), Flaky(error))()
    assert flaky.calls == 1
    assert driver.sleep.waits == []


async def test_cancellation_is_never_retried(async_sleeper: AsyncSleeper) -> None:
    calls = 0

    @retry(sleep=async_sleeper)
    async def wait_forever() -> None:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    task = asyncio.create_task(wait_forever())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


def test_results_matching_the_predicate_are_retried(driver: Driver) -> None:
    replies = [httpx.Response(503), httpx.Response(502), httpx.Response(200)]

    def get() -> httpx.Response:
        return replies.pop(0)

    policy = retry(result=lambda r: r.status_code >= 500, sleep=driver.sleep)
    assert driver.decorate(policy, get)().status_code == 200
    assert len(driver.sleep.waits) == 2


def test_when_attempts_run_out_the_last_result_is_returned(
    driver: Driver, recorder: RecordingObserver
) -> None:
    statuses = iter([503, 502, 504, 200])

    def get() -> httpx.Response:
        return httpx.Response(next(statuses))

    policy = retry(
        attempts=3, result=lambda r: r.status_code >= 500, sleep=driver.sleep, observer=recorder
    )
    assert driver.decorate(policy, get)().status_code == 504
    (gave_up,) = recorder.of(RetryGaveUp)
    assert gave_up.reason == "attempts"
    assert gave_up.cause.status_code == 504  # type: ignore[attr-defined]


def test_the_deadline_counts_the_attempts_and_the_waits(
    clock: FakeClock, driver: Driver, recorder: RecordingObserver
) -> None:
    calls = 0

    def slow() -> None:
        nonlocal calls
        calls += 1
        clock.advance(0.25)
        raise TimeoutError(calls)

    policy = retry(
        attempts=10,
        deadline=1.2,
        jitter="decorrelated",
        base=0.25,
        cap=0.25,  # every wait is exactly 0.25 s
        clock=clock,
        sleep=driver.sleep,
        observer=recorder,
    )
    with pytest.raises(TimeoutError) as raised:
        driver.decorate(policy, slow)()
    # 0.25 run, 0.25 wait, 0.25 run, 0.25 wait, 0.25 run: another wait would reach 1.5 s.
    assert raised.value.args == (3,)
    assert driver.sleep.waits == [0.25, 0.25]
    assert clock.monotonic() == 1.25
    assert [e.reason for e in recorder.of(RetryGaveUp)] == ["deadline"]


@pytest.mark.parametrize("kind", ["sync", "async"])
@given(
    jitter=st.sampled_from(JITTERS),
    attempts=st.integers(1, 30),
    deadline=st.floats(0.01, 30.0),
    base=st.floats(0.001, 2.0),
    cap_factor=st.floats(1.0, 50.0),
    run_time=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**32),
    retry_after=st.none() | st.floats(0.0, 40.0),
)
def test_no_wait_ever_reaches_past_the_deadline(
    *,
    kind: str,
    jitter: Jitter,
    attempts: int,
    deadline: float,
    base: float,
    cap_factor: float,
    run_time: float,
    seed: int,
    retry_after: float | None,
) -> None:
    clock = FakeClock()
    driver = Driver(kind, clock)
    sleeps: list[tuple[float, float]] = []  # (elapsed when the wait starts, wait)

    def fail() -> None:
        clock.advance(run_time)
        if retry_after is None:
            raise ConnectionError
        raise BackendUnavailable("busy", retry_after=retry_after)

    def observe(event: Event, /) -> None:
        if isinstance(event, RetryScheduled):  # sent just before the wait starts
            sleeps.append((clock.monotonic(), event.wait))

    policy = retry(
        attempts=attempts,
        deadline=deadline,
        jitter=jitter,
        base=base,
        cap=base * cap_factor,
        clock=clock,
        sleep=driver.sleep,
        rng=random.Random(seed),
        observer=observe,
    )
    with pytest.raises(ConnectionError if retry_after is None else BackendUnavailable):
        driver.decorate(policy, fail)()
    assert [wait for _, wait in sleeps] == driver.sleep.waits
    assert len(sleeps) <= attempts - 1
    for elapsed, wait in sleeps:
        assert wait >= 0
        assert elapsed + wait < deadline
        if retry_after is not None:
            assert wait >= retry_after
        else:
            assert wait <= base * cap_factor


def test_retry_after_of_a_response_stretches_the_wait(clock: FakeClock, driver: Driver) -> None:
    replies = [
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(503, headers={"Retry-After": email.utils.formatdate(clock.time() + 8)}),
        httpx.Response(200),
    ]

    def get() -> httpx.Response:
        return replies.pop(0)

    policy = retry(result=lambda r: r.status_code in (429, 503), clock=clock, sleep=driver.sleep)
    assert driver.decorate(policy, get)().status_code == 200
    assert driver.sleep.waits == [3.0, 5.0]  # the date is 8 s after the start, read 3 s in


def test_retry_after_of_an_http_status_error(clock: FakeClock, driver: Driver) -> None:
    request = httpx.Request("GET", "https://api.example/")
    response = httpx.Response(429, headers={"Retry-After": "2"}, request=request)
    flaky = Flaky(httpx.HTTPStatusError("429", request=request, response=response))
    policy = retry(on=httpx.HTTPStatusError, clock=clock, sleep=driver.sleep)
    assert driver.decorate(policy, flaky)() == "ok"
    assert driver.sleep.waits == [2.0]


def test_a_jittered_wait_longer_than_retry_after_is_kept(driver: Driver) -> None:
    flaky = Flaky(BackendUnavailable("busy", retry_after=0.001))
    driver.decorate(retry(jitter="equal", base=1.0, cap=1.0, sleep=driver.sleep), flaky)()
    assert len(driver.sleep.waits) == 1
    assert 0.5 <= driver.sleep.waits[0] <= 1.0


def test_a_retry_after_beyond_the_deadline_gives_up_at_once(
    clock: FakeClock, driver: Driver, recorder: RecordingObserver
) -> None:
    calls = 0

    def get() -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(429, headers={"Retry-After": "60"})

    policy = retry(
        deadline=5.0,
        result=lambda r: r.status_code == 429,
        clock=clock,
        sleep=driver.sleep,
        observer=recorder,
    )
    assert driver.decorate(policy, get)().status_code == 429
    assert calls == 1
    assert driver.sleep.waits == []
    assert clock.monotonic() == 0
    assert [e.reason for e in recorder.of(RetryGaveUp)] == ["deadline"]


def test_an_open_circuit_is_retried_when_it_reopens_within_the_deadline(
    clock: FakeClock, driver: Driver
) -> None:
    half_open_soon = CircuitOpenError("open", breaker="payments", retry_after=1.5)
    flaky = Flaky(half_open_soon)
    assert driver.decorate(retry(deadline=5.0, clock=clock, sleep=driver.sleep), flaky)() == "ok"
    assert driver.sleep.waits == [1.5]


def test_an_open_circuit_is_not_waited_for_past_the_deadline(
    clock: FakeClock, driver: Driver
) -> None:
    open_long = CircuitOpenError("open", breaker="payments", retry_after=30.0)
    flaky = Flaky(open_long)
    policy = retry(attempts=5, deadline=10.0, clock=clock, sleep=driver.sleep)
    with pytest.raises(CircuitOpenError) as raised:
        driver.decorate(policy, flaky)()
    assert raised.value is open_long
    assert flaky.calls == 1
    assert driver.sleep.waits == []


async def test_async_functions_are_retried_with_an_async_sleep(
    clock: FakeClock, async_sleeper: AsyncSleeper, recorder: RecordingObserver
) -> None:
    calls = 0

    @retry(attempts=3, clock=clock, sleep=async_sleeper, rng=random.Random(3), observer=recorder)
    async def fetch(url: str, *, page: int = 1) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls < 3:
            raise ConnectionResetError(calls)
        return f"{url}?page={page}"

    assert await fetch("https://api.example", page=2) == "https://api.example?page=2"
    assert calls == 3
    expected = random.Random(3)
    assert async_sleeper.waits == [expected.uniform(0, 0.1), expected.uniform(0, 0.2)]
    assert [e.attempt for e in recorder.of(RetryScheduled)] == [1, 2]
    assert fetch.__name__ == "fetch"


async def test_async_functions_give_up_with_the_last_exception(
    async_sleeper: AsyncSleeper,
) -> None:
    calls = 0

    @retry(attempts=2, sleep=async_sleeper)
    async def fetch() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionResetError(calls)

    with pytest.raises(ConnectionResetError) as raised:
        await fetch()
    assert raised.value.args == (2,)
    assert traceback.extract_tb(raised.value.__traceback__)[-1].name == "fetch"


async def test_async_results_and_retry_after(clock: FakeClock, async_sleeper: AsyncSleeper) -> None:
    replies = [httpx.Response(429, headers={"Retry-After": "4"}), httpx.Response(204)]

    @retry(result=lambda r: r.status_code == 429, clock=clock, sleep=async_sleeper)
    async def get() -> httpx.Response:
        return replies.pop(0)

    assert (await get()).status_code == 204
    assert async_sleeper.waits == [4.0]


async def test_an_async_function_may_take_a_sync_sleep(clock: FakeClock, sleeper: Sleeper) -> None:
    calls = 0

    @retry(sleep=sleeper)
    async def fetch() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError
        return calls

    assert await fetch() == 2
    assert len(sleeper.waits) == 1


def test_the_real_sleep_is_used_by_default(driver: Driver) -> None:
    flaky = Flaky(OSError())
    assert driver.decorate(retry(base=0.001, cap=0.001), flaky)() == "ok"  # a 1 ms wait at most
    assert flaky.calls == 2


def test_events_are_logged_by_default(caplog: pytest.LogCaptureFixture, driver: Driver) -> None:
    caplog.set_level("INFO", logger="resilient")
    policy = retry(attempts=2, sleep=driver.sleep, name="inventory")
    with pytest.raises(OSError, match="down"):
        driver.decorate(policy, Flaky(OSError("down"), OSError("down")))()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("RetryScheduled(block='retry', name='inventory', attempt=1")
    assert messages[1].startswith("RetryGaveUp(block='retry', name='inventory', attempts=2")
    assert [r.levelname for r in caplog.records] == ["INFO", "WARNING"]


def test_methods_and_arguments_pass_through(driver: Driver) -> None:
    class Client:
        def __init__(self) -> None:
            self.calls: list[tuple[int, str]] = []

        def fetch(self, item: int, *, fields: str = "all") -> str:
            self.calls.append((item, fields))
            if len(self.calls) == 1:
                raise ConnectionError
            return f"{item}:{fields}"

        get = driver.decorate(retry(sleep=driver.sleep), fetch)

    client = Client()
    assert client.get(7, fields="name") == "7:name"
    assert client.calls == [(7, "name"), (7, "name")]


async def test_async_functions_retry_only_what_on_names(async_sleeper: AsyncSleeper) -> None:
    calls = 0

    @retry(on=ConnectionError, result=lambda r: r is None, sleep=async_sleeper)
    async def parse(text: str) -> int:
        nonlocal calls
        calls += 1
        return int(text)

    assert await parse("12") == 12  # a good result is returned at once
    with pytest.raises(ValueError, match="invalid literal"):
        await parse("twelve")
    assert calls == 2
    assert async_sleeper.waits == []
