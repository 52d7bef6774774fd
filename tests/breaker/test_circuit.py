"""The breaker's behaviour through its forms: each test runs through the sync driver (a
``def``, ``with``) and the async driver (an ``async def``, ``async with``) where both apply.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from resilient import CircuitOpenError, ConfigurationError
from resilient.breaker import BreakerRegistry, CircuitBreaker, State
from resilient.events import BreakerStateChanged, CallFailed, CallRejected, CallSucceeded
from resilient.testing import FakeClock, RecordingObserver
from tests.breaker.conftest import Via


def state(b: CircuitBreaker) -> State:
    return b.state  # a call, so that mypy does not narrow the property between asserts


class Boom(Exception):
    pass


def breaker(**options: Any) -> CircuitBreaker:
    defaults: dict[str, Any] = {
        "failure_rate": 0.5,
        "minimum_calls": 4,
        "window": 4,
        "open_for": 10.0,
        "clock": FakeClock(),
    }
    return CircuitBreaker("dep", **{**defaults, **options})


def fail() -> None:
    raise Boom("down")


def ok() -> str:
    return "ok"


async def test_it_opens_on_the_failure_rate_and_rejects_until_open_for_ends(via: Via) -> None:
    clock, recorder = FakeClock(), RecordingObserver()
    b = breaker(clock=clock, observer=recorder)
    guarded_fail, guarded_ok = via.guard(b, fail), via.guard(b, ok)
    assert await guarded_ok() == "ok"
    assert await guarded_ok() == "ok"
    with pytest.raises(Boom):
        await guarded_fail()
    assert state(b) is State.CLOSED
    with pytest.raises(Boom):
        await guarded_fail()  # 2 of 4 = 0.5: open
    assert state(b) is State.OPEN
    with pytest.raises(CircuitOpenError) as raised:
        await guarded_ok()
    assert raised.value.retry_after == 10.0
    assert raised.value.breaker == "dep"
    clock.advance(9.5)
    with pytest.raises(CircuitOpenError) as raised:
        await guarded_ok()
    assert raised.value.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert state(b) is State.HALF_OPEN
    assert await guarded_ok() == "ok"  # the probe succeeds: closed
    assert state(b) is State.CLOSED
    assert [(e.old, e.new) for e in recorder.of(BreakerStateChanged)] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert len(recorder.of(CallRejected)) == 2
    assert len(recorder.of(CallFailed)) == 2


async def test_async_functions_and_call_and_context_managers() -> None:
    b = breaker()

    @b
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        if x < 0:
            raise Boom("negative")
        return x * 2

    assert await fetch(2) == 4
    assert await b.call(fetch.__wrapped__, 3) == 6  # type: ignore[attr-defined]
    assert b.call(lambda: 5) == 5
    with b:
        pass
    async with b:
        pass
    for _ in range(2):
        with pytest.raises(Boom):
            await fetch(-1)
    assert state(b) is State.OPEN
    with pytest.raises(CircuitOpenError):
        async with b:
            raise AssertionError("not run")
    with pytest.raises(CircuitOpenError), b:
        raise AssertionError("not run")
    with pytest.raises(CircuitOpenError):
        await fetch(1)


async def test_context_manager_failures_count(via: Via) -> None:
    b = breaker()
    for _ in range(4):
        with pytest.raises(Boom):
            async with via.block(b):
                fail()
    assert state(b) is State.OPEN


async def test_nested_context_managers_in_concurrent_tasks_keep_their_own_entries(
    via: Via,
) -> None:
    clock = FakeClock()
    b = breaker(clock=clock, slow_call_duration=1.0, window=10, minimum_calls=10)
    gate = asyncio.Event()

    async def task(slow: bool) -> None:
        async with via.block(b):
            await gate.wait()
            if slow:
                clock.advance(2)

    tasks = [asyncio.create_task(task(i % 2 == 0)) for i in range(6)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    metrics = b.metrics()
    assert metrics["calls"] == 6
    assert metrics["failures"] == 0


async def test_record_ignore_and_failure_when_classify_outcomes(via: Via) -> None:
    b = breaker(record=(Boom,), ignore=(KeyError,), failure_when=lambda r: r == "bad")

    def classified(kind: str) -> str:
        if kind == "key":
            raise KeyError(kind)
        if kind == "value":
            raise ValueError("invalid literal")
        return kind

    guarded = via.guard(b, classified)
    with pytest.raises(KeyError):
        await guarded("key")  # ignored: counts as nothing
    with pytest.raises(ValueError, match="invalid literal"):
        await guarded("value")  # not recorded: counts as a success
    assert await guarded("bad") == "bad"  # a failure by the predicate
    assert b.metrics() == {
        "calls": 2,
        "failures": 1,
        "slow_calls": 0,
        "failure_rate": 0.5,
        "slow_call_rate": 0.0,
    }


async def test_a_response_predicate_for_httpx(via: Via) -> None:
    b = breaker(failure_when=lambda r: r.status_code >= 500 or r.status_code == 429)
    respond = via.guard(b, httpx.Response)
    for status in (200, 503, 429, 201):
        await respond(status)
    assert state(b) is State.OPEN


async def test_slow_calls_open_the_circuit(via: Via) -> None:
    clock = FakeClock()
    b = breaker(clock=clock, slow_call_duration=1.0, slow_call_rate=0.5, failure_rate=1.0)
    work = via.guard(b, clock.advance)
    await work(0.5)
    await work(1.5)
    await work(0.2)
    assert state(b) is State.CLOSED
    await work(1.01)
    assert state(b) is State.OPEN
    assert b.metrics()["slow_call_rate"] == 0.5


async def test_time_based_window_forgets_old_calls(via: Via) -> None:
    clock = FakeClock()
    b = breaker(clock=clock, window=10, window_type="time", minimum_calls=3)
    guarded_fail, guarded_ok = via.guard(b, fail), via.guard(b, ok)
    with pytest.raises(Boom):
        await guarded_fail()
    with pytest.raises(Boom):
        await guarded_fail()
    clock.advance(11)  # those two failures leave the window
    await guarded_ok()
    await guarded_ok()
    with pytest.raises(Boom):
        await guarded_fail()
    assert state(b) is State.CLOSED  # 1 failure in 3 calls
    with pytest.raises(Boom):
        await guarded_fail()
    assert state(b) is State.OPEN  # 2 in 4


async def test_fallback_answers_while_open(via: Via) -> None:
    b = breaker(fallback=lambda x: f"cached {x}")
    guarded = via.guard(b, lambda x: fail())
    for _ in range(4):
        with pytest.raises(Boom):
            await guarded(1)
    assert await guarded(7) == "cached 7"


async def test_async_fallback() -> None:
    async def cached(x: int) -> str:
        return f"cached {x}"

    b = breaker(fallback=cached)

    @b
    async def failing(x: int) -> str:
        raise Boom

    for _ in range(4):
        with pytest.raises(Boom):
            await failing(1)
    assert await failing(3) == "cached 3"


async def test_manual_control(via: Via) -> None:
    recorder = RecordingObserver()
    b = breaker(observer=recorder)
    guarded = via.guard(b, ok)
    b.force_open()
    assert state(b) is State.FORCED_OPEN
    with pytest.raises(CircuitOpenError) as raised:
        await guarded()
    assert raised.value.retry_after == float("inf")
    b.disable()
    for _ in range(10):
        with pytest.raises(Boom):
            await via.guard(b, fail)()
    assert state(b) is State.DISABLED  # records nothing
    b.reset()
    assert state(b) is State.CLOSED
    assert b.metrics()["calls"] == 0
    b.force_closed()
    assert state(b) is State.CLOSED
    assert [e.new for e in recorder.of(BreakerStateChanged)] == [
        "forced_open",
        "disabled",
        "closed",
    ]


async def trip(via: Via, b: CircuitBreaker) -> None:
    for _ in range(4):
        with pytest.raises(Boom):
            await via.guard(b, fail)()


async def test_half_open_admits_exactly_the_probes_and_reopens_longer(via: Via) -> None:
    clock = FakeClock()
    b = breaker(clock=clock, half_open_calls=2, open_for_growth=2.0, max_open_for=30.0)
    await trip(via, b)
    clock.advance(10)
    await via.enter(b)
    await via.enter(b)  # two probes are out
    with pytest.raises(CircuitOpenError) as raised:
        await via.call(b, ok)
    assert raised.value.retry_after == 0.0
    await via.exit(b, Boom())
    await via.exit(b)  # 1 failure in 2 probes = 0.5: open again, for 20 s
    assert state(b) is State.OPEN
    clock.advance(19)
    with pytest.raises(CircuitOpenError):
        await via.call(b, ok)
    clock.advance(1)
    assert await via.call(b, ok) == "ok"


async def test_a_cancelled_probe_gives_its_slot_back(via: Via) -> None:
    clock = FakeClock()
    b = breaker(clock=clock, half_open_calls=1)
    await trip(via, b)
    clock.advance(10)
    with pytest.raises(asyncio.CancelledError):
        async with via.block(b):
            raise asyncio.CancelledError
    assert state(b) is State.HALF_OPEN
    assert await via.call(b, ok) == "ok"
    assert state(b) is State.CLOSED


async def test_outcomes_of_calls_from_before_a_transition_do_not_count(via: Via) -> None:
    clock = FakeClock()
    b = breaker(clock=clock, half_open_calls=1, minimum_calls=2, window=2)
    await via.enter(b)  # a slow call starts while closed
    for _ in range(2):
        with pytest.raises(Boom):
            await via.guard(b, fail)()
    clock.advance(10)
    await via.enter(b)  # the probe
    await via.exit(b, Boom())  # LIFO: this is the probe's exit... it failed
    assert state(b) is State.OPEN
    await via.exit(b)  # the old call ends: its success changes nothing
    assert state(b) is State.OPEN


async def test_successes_are_observed_only_on_request(via: Via) -> None:
    recorder = RecordingObserver()
    await via.guard(breaker(observer=recorder), ok)()
    assert recorder.of(CallSucceeded) == []
    await via.guard(breaker(observer=recorder, observe_successes=True), ok)()
    assert len(recorder.of(CallSucceeded)) == 1


async def test_500_coroutines_on_a_half_open_breaker_admit_exactly_the_probes() -> None:
    clock = FakeClock()
    b = breaker(clock=clock, half_open_calls=3)
    for _ in range(4):
        with pytest.raises(Boom):
            b(fail)()
    clock.advance(10)
    gate = asyncio.Event()
    admitted = 0

    @b
    async def probe() -> None:
        nonlocal admitted
        admitted += 1
        await gate.wait()

    tasks = [asyncio.create_task(probe()) for _ in range(500)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert admitted == 3
    assert sum(1 for r in results if isinstance(r, CircuitOpenError)) == 497
    assert state(b) is State.CLOSED


def test_8_threads_on_a_half_open_breaker_admit_exactly_the_probes() -> None:
    clock = FakeClock()
    b = breaker(clock=clock, half_open_calls=3)
    for _ in range(4):
        with pytest.raises(Boom):
            b(fail)()
    clock.advance(10)
    barrier, release = threading.Barrier(8), threading.Event()
    admitted, rejected = [], []

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            try:
                b.__enter__()
            except CircuitOpenError:
                rejected.append(1)
                continue
            admitted.append(1)
            release.wait()
            b.__exit__(None, None, None)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    # Until the rejected threads are done and the three probes have said so (a probe
    # admitted may not have appended yet when the others finish).
    while (sum(t.is_alive() for t in threads) > 3 or len(admitted) < 3) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.001)  # waiting for the rejected threads to finish, not timing
    assert len(admitted) == 3  # the three probes, each holding its thread at the gate
    assert len(rejected) == 5 * 50
    release.set()
    for t in threads:
        t.join()
    assert state(b) is State.CLOSED


def test_threads_on_a_closed_breaker_count_every_call() -> None:
    b = breaker(window=1000, minimum_calls=1000, failure_rate=1.0)
    guarded = b(ok)
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(100):
            guarded()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.metrics()["calls"] == 800


def test_registry_gives_one_breaker_per_key_and_stays_bounded() -> None:
    registry = BreakerRegistry(lambda host: CircuitBreaker(f"http:{host}"), max_size=3)
    a = registry.get("a")
    assert registry.get("a") is a
    for host in ("b", "c", "d"):
        registry.get(host)
    assert len(registry) == 3
    assert {br.name for br in registry} == {"http:b", "http:c", "http:d"}


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="non-empty name"):
        CircuitBreaker("")
    with pytest.raises(ConfigurationError, match="slow_call_duration"):
        CircuitBreaker("x", slow_call_duration=0)
    with pytest.raises(ConfigurationError, match="max_size"):
        BreakerRegistry(CircuitBreaker, max_size=0)
