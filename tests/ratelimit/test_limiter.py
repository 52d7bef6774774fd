from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from resilient import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    MemoryBackend,
    RateLimiter,
    SlidingWindow,
    TokenBucket,
)
from resilient.events import BackendFailed, Event, RateLimited
from resilient.ratelimit import ImmediateRateLimitStore
from resilient.ratelimit.core import Charge, Outcome, Policy
from resilient.ratelimit.memory import MemoryRateLimitStore
from resilient.ratelimit.store import Admit
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


class CountingStore:
    """A RateLimitStore in memory that counts the checks it answers."""

    def __init__(self) -> None:
        self.store = MemoryRateLimitStore(MemoryBackend())
        self.checks = 0

    async def check(
        self, key: str, policies: Sequence[Policy], cost: int, now_ms: int | None, consume: bool
    ) -> Sequence[Outcome]:
        self.checks += 1
        return await self.store.check(key, policies, cost, now_ms, consume)

    async def clear(self, key: str, policies: Sequence[Policy]) -> None:
        await self.store.clear(key, policies)


async def test_the_deny_cache_is_bounded() -> None:
    store = CountingStore()
    limiter = RateLimiter(store, clock=FakeClock(), deny_cache=3)
    policy = TokenBucket("1/minute")
    for i in range(10):
        await limiter.hit(f"k{i}", policy)
        await limiter.hit(f"k{i}", policy)
    store.checks = 0
    for i in (9, 8, 7):  # the three latest denials are remembered
        assert not (await limiter.hit(f"k{i}", policy)).allowed
    assert store.checks == 0
    for i in range(7):  # the seven before them were forgotten: the store answers again
        assert not (await limiter.hit(f"k{i}", policy)).allowed
    assert store.checks == 7


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


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RateLimiter(clock=object()), "clock must be a Clock"),  # type: ignore[arg-type]
        (lambda: RateLimiter(observer="log"), "observer must be a callable"),  # type: ignore[arg-type]
        (lambda: RateLimiter(backend_retry_after="1"), "backend_retry_after"),  # type: ignore[arg-type]
        (lambda: RateLimiter(backend_retry_after=float("inf")), "backend_retry_after"),
        (lambda: RateLimiter(backend_retry_after=True), "backend_retry_after"),
    ],
)
def test_the_rest_of_the_configuration_is_checked_too(make, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=message):
        make()


async def test_an_admitter_charges_the_state_hit_counts_until_it_would_deny() -> None:
    events: list[Event] = []
    limiter = RateLimiter(clock=FakeClock(), observer=events.append)
    policy = TokenBucket("3/minute", block_for=600)
    admit = limiter.admitter(policy, prefix="user:")
    assert admit is not None
    charged = [admit("42") for _ in range(3)]
    assert [charge[1] for charge in charged if charge is not None] == [2, 1, 0]
    assert [charge[2] for charge in charged if charge is not None] == [20_000, 40_000, 60_000]
    assert (await limiter.peek("user:42", policy)).remaining == 0
    assert admit("42") is None  # a denial: nothing changed, nothing reported ...
    assert events == []
    assert (await limiter.peek("user:42", policy)).retry_after == 20.0
    denied = await limiter.hit("user:42", policy)  # ... the full check answers it
    assert denied.retry_after == 600.0  # and records the block
    assert len(events) == 1
    assert admit("7") is not None  # another key


async def test_an_admitter_keeps_to_the_limiters_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    admit = limiter.admitter(TokenBucket("1/minute"), cost=1, prefix="k")
    assert admit is not None
    assert admit("1") is not None
    assert admit("1") is None
    clock.advance(60)
    assert admit("1") is not None


async def test_an_admitter_without_a_prefix_leaves_keys_hit_refuses_to_hit() -> None:
    limiter = RateLimiter(clock=FakeClock())
    admit = limiter.admitter(TokenBucket("5/minute"))
    assert admit is not None
    assert admit("") is None
    assert admit(42) is None  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="non-empty string"):
        await limiter.hit("", TokenBucket("5/minute"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda lim: lim.admitter("1/s"), "not a rate-limit policy"),
        (lambda lim: lim.admitter(TokenBucket("1/s"), cost=2), "exceeds the capacity"),
        (lambda lim: lim.admitter(TokenBucket("1/s"), cost=-1), "cost must be"),
        (lambda lim: lim.admitter(TokenBucket("1/s"), prefix=b"ip:"), "prefix must be"),
    ],
)
def test_an_admitter_is_validated_when_it_is_made(make, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=message):
        make(RateLimiter())


def test_there_is_no_admitter_where_checks_are_awaited_or_denials_cached() -> None:
    policy = TokenBucket("5/minute")
    assert RateLimiter(CountingStore()).admitter(policy) is None  # a store that awaits
    assert RateLimiter(deny_cache=10).admitter(policy) is None


class ImmediateStore(CountingStore):
    """A user's store with the fast-path protocol, counting which way it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.checks_now = 0
        self.admitted: list[str] = []

    def check_now(
        self, key: str, policies: Sequence[Policy], cost: int, now_ms: int | None, consume: bool
    ) -> Sequence[Outcome]:
        self.checks_now += 1
        return self.store.check_now(key, policies, cost, now_ms, consume)

    def admitter(
        self,
        policy: Policy,
        *,
        cost: int = 1,
        prefix: str = "",
        now_ms: Callable[[], int] | None = None,
    ) -> Admit:
        admit = self.store.admitter(policy, cost=cost, prefix=prefix, now_ms=now_ms)

        def counted(key: str) -> Charge | None:
            self.admitted.append(prefix + key)
            return admit(key)

        return counted


async def test_a_store_with_the_fast_path_protocol_is_asked_without_awaiting() -> None:
    store = ImmediateStore()
    assert isinstance(store, ImmediateRateLimitStore)
    assert not isinstance(CountingStore(), ImmediateRateLimitStore)
    limiter = RateLimiter(store, clock=FakeClock())
    policy = SlidingWindow("2/minute")
    assert (await limiter.hit("k", policy)).remaining == 1
    assert (store.checks, store.checks_now) == (0, 1)
    admit = limiter.admitter(policy, prefix="k")
    assert admit is not None
    assert admit("") is not None
    assert admit("") is None
    assert store.admitted == ["k", "k"]
    assert not (await limiter.hit("k", policy)).allowed
    assert (store.checks, store.checks_now) == (0, 2)
