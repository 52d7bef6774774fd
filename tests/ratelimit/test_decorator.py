from __future__ import annotations

import pytest

from resilient import (
    ConfigurationError,
    RateLimiter,
    RateLimitExceeded,
    SlidingWindow,
    TokenBucket,
    rate_limit,
)
from resilient.testing import FakeClock


async def test_denied_calls_raise_without_running() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    ran: list[str] = []

    @rate_limit(limiter, TokenBucket("2/minute"), key="tenant:{tenant}")
    async def export(tenant: str, *, fmt: str = "csv") -> str:
        ran.append(tenant)
        return f"{tenant}.{fmt}"

    assert await export("a") == "a.csv"
    assert await export(tenant="a", fmt="json") == "a.json"
    with pytest.raises(RateLimitExceeded) as raised:
        await export("a")
    assert raised.value.retry_after == 30.0
    assert raised.value.decision.limit == 2
    assert await export("b") == "b.csv"  # another key
    clock.advance(30)
    assert await export("a") == "a.csv"
    assert ran == ["a", "a", "b", "a"]
    assert export.__name__ == "export"


async def test_key_may_be_a_callable_and_cost_is_charged() -> None:
    limiter = RateLimiter(clock=FakeClock())

    @rate_limit(limiter, SlidingWindow("10/hour"), key=lambda n: f"n:{n % 2}", cost=5)
    async def work(n: int) -> int:
        return n

    assert await work(1) == 1
    assert await work(3) == 3
    with pytest.raises(RateLimitExceeded):
        await work(5)
    assert await work(2) == 2


def test_bad_configuration_fails_at_decoration_time() -> None:
    limiter = RateLimiter()
    with pytest.raises(ConfigurationError, match="names \\['user'\\]"):

        @rate_limit(limiter, TokenBucket("1/second"), key="{user}")
        async def f(tenant: str) -> None: ...

    with pytest.raises(TypeError, match="async"):

        @rate_limit(limiter, TokenBucket("1/second"), key="k")  # type: ignore[arg-type]
        def g() -> None: ...

    with pytest.raises(ConfigurationError, match="at least one policy"):
        rate_limit(limiter, key="k")
    with pytest.raises(ConfigurationError, match="given twice"):
        rate_limit(limiter, TokenBucket("1/second"), TokenBucket("1/second"), key="k")


async def test_a_key_function_returning_junk_is_a_clear_error() -> None:
    limiter = RateLimiter()

    @rate_limit(limiter, TokenBucket("1/second"), key=lambda: "")
    async def f() -> None: ...

    with pytest.raises(ConfigurationError, match="non-empty string"):
        await f()


async def test_a_key_function_returning_another_type_is_a_clear_error_too() -> None:
    limiter = RateLimiter()

    @rate_limit(limiter, TokenBucket("1/second"), key=lambda n: n)
    async def f(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match="non-empty string"):
        await f(42)
