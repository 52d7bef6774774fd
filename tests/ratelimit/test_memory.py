"""What only the memory backend does: bounds, eviction, threads."""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import statistics
import threading
import time
import tracemalloc

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


def held() -> int:
    """Return the bytes traced by tracemalloc that are still held, garbage collected."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def test_a_full_store_makes_room_in_the_same_time_however_large_it_is() -> None:
    # At its bound a new key evicts one in O(log n): a store that walked its entries to
    # make room would take a hundred times longer at 100,000 keys than at 1,000.
    clock = FakeClock()
    policy = TokenBucket("5/minute")
    limiters: dict[int, RateLimiter] = {}
    for size in (1_000, 100_000):
        limiter = RateLimiter(MemoryBackend(max_keys=size), clock=clock, observer=None)
        for i in range(size):
            await limiter.hit(f"fill{i}", policy)
        limiters[size] = limiter
    fresh = itertools.count()
    times: dict[int, list[float]] = {size: [] for size in limiters}
    for _ in range(15):  # both stores in turn: the machine's drift touches them alike
        for size, limiter in limiters.items():
            start = time.perf_counter()
            for _ in range(200):  # all unique: the hostile case
                await limiter.hit(f"new{next(fresh)}", policy)
            times[size].append(time.perf_counter() - start)
            clock.advance(0.001)
    assert statistics.median(times[100_000]) < 5 * statistics.median(times[1_000])


async def test_a_full_store_holds_no_more_memory_however_many_new_keys_come() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=1_000)
    limiter = RateLimiter(backend, clock=clock, observer=None)
    policy, daily = TokenBucket("5/minute"), TokenBucket("100/day")
    tracemalloc.start()
    try:
        for i in range(1_000):
            await limiter.hit(f"k{i}", policy)
        full = held()
        for i in range(1_000, 6_000):  # all unique: the hostile case; some keys hit again
            await limiter.hit(f"k{i}", policy)
            await limiter.hit(f"k{i // 2}", policy, daily)
            clock.advance(0.001)
        after = held()
    finally:
        tracemalloc.stop()
    assert len(store_of(backend)) == 1_000
    assert after < 2 * full  # what it files its keys by stays within twice the keys


async def test_keys_that_come_and_go_below_the_bound_leave_nothing_behind() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=1_000_000)
    limiter = RateLimiter(backend, clock=clock, observer=None)
    policy = TokenBucket("5/second")
    tracemalloc.start()
    try:
        for i in range(5_000):
            await limiter.hit(f"kept{i}", TokenBucket("1/day"))
        before = held()
        for i in range(10_000):  # keys that come and go: reset (after a login, say)
            await limiter.hit(f"k{i}", policy)
            await limiter.reset(f"k{i}", policy)
            clock.advance(0.001)
        after = held()
    finally:
        tracemalloc.stop()
    assert len(store_of(backend)) == 5_000
    assert after < 1.25 * before


POLICIES = [TokenBucket("2/minute"), SlidingWindow("3/minute"), TokenBucket("1/hour")]


@settings(max_examples=200, deadline=None)
@given(
    hits=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 2), st.integers(0, 300)), max_size=60
    ),
    max_keys=st.integers(1, 6),
)
async def test_a_new_key_evicts_the_entry_that_expires_first(
    hits: list[tuple[int, int, int]], max_keys: int
) -> None:
    # Within a trace (18 s at most) no entry expires: the store holds exactly the entries
    # admitted hits wrote, less those it evicted, and a peek tells whether it holds one
    # (a held entry has charged units: fewer than the capacity remain).
    clock = FakeClock()
    backend = MemoryBackend(max_keys=max_keys)
    limiter = RateLimiter(backend, clock=clock)
    held_until: dict[tuple[int, int], int] = {}  # (key, policy): when its entry expires

    async def holds(entry: tuple[int, int]) -> bool:
        key, index = entry
        policy = POLICIES[index]
        return (await limiter.peek(f"k{key}", policy)).remaining < policy.capacity

    for key, index, elapsed in hits:
        clock.advance(elapsed / 1000)
        now_ms = math.floor(clock.time() * 1000)
        first = min(held_until.values(), default=None)
        decision = await limiter.hit(f"k{key}", POLICIES[index])
        if decision.allowed:
            if (key, index) not in held_until and len(held_until) == max_keys:
                # A new key in a full store: one of the entries that expire first made room.
                gone = [entry for entry in held_until if not await holds(entry)]
                assert len(gone) == 1
                assert held_until[gone[0]] == first
                del held_until[gone[0]]
            held_until[key, index] = now_ms + round(decision.reset_after * 1000)
        assert len(store_of(backend)) == len(held_until)
        for entry in held_until:
            assert await holds(entry)
