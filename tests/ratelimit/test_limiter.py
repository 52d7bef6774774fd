from __future__ import annotations

from collections.abc import Sequence

import pytest

from resilient import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    RateLimiter,
    SlidingWindow,
    TokenBucket,
)
from resilient.events import BackendFailed, Event, RateLimited
from resilient.ratelimit.core import Outcome, Policy
from resilient.testing import FakeClock


class BrokenStore:
    """A RateLimitStore whose backend is down."""

    calls = 0

    async def check(
        self, key: str, policies: Sequence[Policy], cost: int, now_ms: int | None, consume: bool
    ) -> Sequence[Outcome]:
        self.calls += 1
        raise BackendError("down")

    async def clear(self, key: str, policies: Sequence[Policy]) -> None:
        raise BackendError("down")


async def test_a_denial_emits_an_event() -> None:
    events: list[Event] = []
    limiter = RateLimiter(clock=FakeClock(), observer=events.append)
    policy = TokenBucket("1/minute", name="login")
    await limiter.hit("ip:1", policy)
    await limiter.hit("ip:1", policy)
    [event] = events
    assert event == RateLimited("ratelimit", "ip:1", "login", 60.0)


async def test_a_broken_observer_never_breaks_a_check(caplog: pytest.LogCaptureFixture) -> None:
    def observer(event: Event) -> None:
        raise RuntimeError("metrics exporter down")

    limiter = RateLimiter(clock=FakeClock(), observer=observer)
    await limiter.hit("k", TokenBucket("1/minute"))
    assert not (await limiter.hit("k", TokenBucket("1/minute"))).allowed
    assert "observer" in caplog.text


async def test_a_user_store_plugs_in_and_fails_open() -> None:
    events: list[Event] = []
    store = BrokenStore()
    limiter = RateLimiter(store, observer=events.append)
    decision = await limiter.hit("k", TokenBucket("5/minute"))
    assert decision.allowed
    assert decision.degraded
    assert decision.remaining == 5
    assert isinstance(events[0], BackendFailed)
    assert events[0].outcome == "admitted"


async def test_fail_closed_raises_with_retry_after() -> None:
    limiter = RateLimiter(BrokenStore(), on_backend_error="closed", backend_retry_after=2.5)
    with pytest.raises(BackendUnavailable) as raised:
        await limiter.hit("k", TokenBucket("5/minute"))
    assert raised.value.retry_after == 2.5
    with pytest.raises(BackendError):
        await limiter.reset("k", TokenBucket("5/minute"))


async def test_the_deny_cache_spares_the_store_and_forgets_on_reset() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, deny_cache=10)
    policy = TokenBucket("1/minute")
    await limiter.hit("k", policy)
    first = await limiter.hit("k", policy)
    clock.advance(20)
    cached = await limiter.hit("k", policy)
    assert not cached.allowed
    assert cached.retry_after == pytest.approx(first.retry_after - 20)
    await limiter.reset("k", policy)
    assert (await limiter.hit("k", policy)).allowed


async def test_the_deny_cache_is_bounded() -> None:
    limiter = RateLimiter(clock=FakeClock(), deny_cache=3)
    policy = TokenBucket("1/minute")
    for i in range(10):
        await limiter.hit(f"k{i}", policy)
        await limiter.hit(f"k{i}", policy)
    assert len(limiter._deny_cache) == 3


async def test_peek_charges_nothing() -> None:
    limiter = RateLimiter(clock=FakeClock())
    policy = SlidingWindow("3/minute")
    await limiter.hit("k", policy)
    for _ in range(5):
        decision = await limiter.peek("k", policy)
        assert decision.allowed
        assert decision.remaining == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda lim: lim.hit("", TokenBucket("1/s")), "non-empty string"),
        (lambda lim: lim.hit("k"), "at least one policy"),
        (lambda lim: lim.hit("k", "1/s"), "not a rate-limit policy"),
        (lambda lim: lim.hit("k", TokenBucket("1/s"), cost=2), "exceeds the capacity"),
        (lambda lim: lim.hit("k", TokenBucket("1/s"), cost=-1), "cost must be"),
        (lambda lim: lim.hit("k", TokenBucket("1/s"), TokenBucket("1/s")), "given twice"),
    ],
)
async def test_bad_calls_raise_clear_errors(call, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=message):
        await call(RateLimiter())


def test_bad_configuration_raises_clear_errors() -> None:
    with pytest.raises(ConfigurationError, match="on_backend_error"):
        RateLimiter(on_backend_error="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="deny_cache"):
        RateLimiter(deny_cache=-1)
    with pytest.raises(ConfigurationError, match="backend_retry_after"):
        RateLimiter(backend_retry_after=0)
    with pytest.raises(ConfigurationError, match="needs a MemoryBackend"):
        RateLimiter(object())  # type: ignore[arg-type]
