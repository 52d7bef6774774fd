"""What only the memory backend does: bounds, eviction, threads."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient import ConfigurationError, MemoryBackend, RateLimiter, SlidingWindow, TokenBucket
from resilient.ratelimit.memory import MemoryRateLimitStore
from resilient.testing import FakeClock


def store_of(backend: MemoryBackend) -> MemoryRateLimitStore:
    return backend.store("ratelimit", MemoryRateLimitStore)


async def test_the_store_never_holds_more_than_max_keys() -> None:
    backend = MemoryBackend(max_keys=100)
    limiter = RateLimiter(backend, clock=FakeClock())
    for i in range(1000):
        await limiter.hit(f"k{i}", TokenBucket("1/hour"))
        assert len(store_of(backend)) <= 100


async def test_expired_keys_are_evicted_before_live_ones() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=10)
    limiter = RateLimiter(backend, clock=clock)
    short, long = TokenBucket("1/second"), TokenBucket("1/day")
    await limiter.hit("keeper", long)
    for i in range(9):
        await limiter.hit(f"short{i}", short)
    clock.advance(2)  # every short-lived key has expired
    for i in range(5):
        await limiter.hit(f"new{i}", long)
    assert not (await limiter.hit("keeper", long)).allowed  # still remembered


async def test_under_pressure_the_keys_closest_to_expiry_go_first() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=10)
    limiter = RateLimiter(backend, clock=clock)
    await limiter.hit("daily", TokenBucket("1/day"))
    for i in range(20):
        await limiter.hit(f"minute{i}", TokenBucket("1/minute"))
    assert not (await limiter.peek("daily", TokenBucket("1/day"))).allowed


async def test_backends_shared_by_limiters_share_state() -> None:
    backend = MemoryBackend()
    one, two = RateLimiter(backend), RateLimiter(backend)
    policy = SlidingWindow("1/hour")
    assert (await one.hit("k", policy)).allowed
    assert not (await two.hit("k", policy)).allowed


def test_threads_admit_exactly_the_limit() -> None:
    limiter = RateLimiter(MemoryBackend())
    policy = TokenBucket("300/hour")
    admitted: list[int] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        async def run() -> int:
            barrier.wait()
            return sum([(await limiter.hit("k", policy)).allowed for _ in range(100)])

        admitted.append(asyncio.run(run()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 300


def test_max_keys_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="max_keys"):
        MemoryBackend(max_keys=0)


class Unscannable(dict[str, Any]):
    """A dict that counts the walks through it: making room must not walk the entries."""

    walks = 0

    def __iter__(self) -> Any:
        type(self).walks += 1
        return super().__iter__()

    def items(self) -> Any:
        type(self).walks += 1
        return super().items()

    def keys(self) -> Any:
        type(self).walks += 1
        return super().keys()

    def values(self) -> Any:
        type(self).walks += 1
        return super().values()


async def test_a_full_store_makes_room_without_walking_its_entries() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=1_000)
    limiter = RateLimiter(backend, clock=clock)
    store = store_of(backend)
    store._data = Unscannable()
    Unscannable.walks = 0
    policy = TokenBucket("5/minute")
    for i in range(5_000):  # all unique: the hostile case; some keys hit again
        await limiter.hit(f"k{i}", policy)
        await limiter.hit(f"k{i // 2}", policy, TokenBucket("100/day"))
        clock.advance(0.001)
    assert Unscannable.walks == 0
    assert len(store) == 1_000
    assert len(store._expiries) <= 2 * 1_000 + 64


async def test_below_the_bound_churn_never_walks_the_entries_either() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=1_000_000)
    limiter = RateLimiter(backend, clock=clock)
    store = store_of(backend)
    for i in range(5_000):
        await limiter.hit(f"kept{i}", TokenBucket("1/day"))
    store._data = Unscannable(store._data)
    Unscannable.walks = 0
    policy = TokenBucket("5/second")
    for i in range(20_000):  # keys that come and go: reset (after a login, say)
        await limiter.hit(f"k{i}", policy)
        await limiter.reset(f"k{i}", policy)
        clock.advance(0.001)
    assert Unscannable.walks == 0
    assert len(store._expiries) <= 5_000 + 4


POLICIES = [TokenBucket("2/second"), SlidingWindow("3/minute"), TokenBucket("1/hour")]


@settings(max_examples=200, deadline=None)
@given(
    hits=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 2), st.integers(0, 3_000)), max_size=60
    ),
    max_keys=st.integers(1, 6),
)
async def test_a_new_key_evicts_the_entry_that_expires_first(
    hits: list[tuple[int, int, int]], max_keys: int
) -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=max_keys)
    limiter = RateLimiter(backend, clock=clock)
    store = store_of(backend)
    for key, policy, elapsed in hits:
        clock.advance(elapsed / 1000)
        before = {name: expires for name, (_, expires) in store._data.items()}
        await limiter.hit(f"k{key}", POLICIES[policy])
        after = set(store._data)
        gone = set(before) - after
        assert len(after) <= max_keys
        if gone:  # a new key came in: the one that expires first made room for it
            assert len(gone) == 1
            assert gone == {min(before, key=lambda name: (before[name], name))}
