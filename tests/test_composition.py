"""The documented order, outermost first: fallback -> retry -> breaker -> timeout -> call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from resilient import CircuitBreaker, CircuitOpenError, retry
from resilient.testing import FakeClock


class Down(Exception):
    pass


def stack(
    clock: FakeClock, *, deadline: float, open_for: float
) -> tuple[Callable[[], Awaitable[str]], CircuitBreaker, list[str]]:
    calls: list[str] = []
    breaker = CircuitBreaker(
        "payments",
        failure_rate=0.5,
        minimum_calls=2,
        window=2,
        open_for=open_for,
        clock=clock,
    )

    @retry(
        attempts=6,
        deadline=deadline,
        base=0.01,
        cap=0.01,
        on=Exception,
        clock=clock,
        sleep=clock.sleep,
    )
    @breaker
    async def charge() -> str:
        async with asyncio.timeout(1.0):  # the attempt timeout, innermost
            await asyncio.sleep(0)  # the downstream call
            calls.append("attempt")
            if len(calls) <= 3:
                raise Down
            return "charged"

    async def with_fallback() -> str:  # the fallback, outermost
        try:
            return await charge()
        except (Down, CircuitOpenError) as exc:
            return f"fallback after {type(exc).__name__}"

    return with_fallback, breaker, calls


async def test_the_breaker_sees_every_attempt_and_retry_waits_out_a_short_open() -> None:
    clock = FakeClock()
    call, breaker, calls = stack(clock, deadline=30.0, open_for=5.0)
    assert await call() == "charged"
    # attempts 1 and 2 fail and open the circuit; retry meets CircuitOpenError, waits out
    # its retry_after (5 s, within the 30 s deadline), and the probe, attempt 3, fails and
    # reopens; after 5 s more, attempt 4 succeeds and closes the circuit.
    assert calls == ["attempt"] * 4
    assert breaker.state.value == "closed"
    assert clock.monotonic() >= 10.0


async def test_retry_never_waits_an_open_circuit_past_its_deadline() -> None:
    clock = FakeClock()
    call, breaker, calls = stack(clock, deadline=3.0, open_for=60.0)
    assert await call() == "fallback after CircuitOpenError"
    assert calls == ["attempt"] * 2  # the open circuit costs no attempt
    assert clock.monotonic() < 3.0
    assert breaker.state.value == "open"
