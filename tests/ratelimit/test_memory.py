"""What only the memory backend does: bounds, eviction, threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

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
