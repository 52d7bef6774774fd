from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from resilient import ConfigurationError, MemoryBackend
from resilient.cache import MISSING, Cache, cached
from resilient.cache.memory import MemoryCacheStore
from resilient.events import CacheRefreshed, Event, StaleServed
from resilient.testing import FakeClock


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event, /) -> None:
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Loader:
    """A loader that counts its calls, can fail, and can be held at a gate."""

    def __init__(self, clock: FakeClock | None = None, compute: float = 0.0) -> None:
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.clock = clock
        self.compute = compute

    async def __call__(self) -> dict[str, int]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.clock is not None:
            self.clock.advance(self.compute)  # the time the value takes to compute
        if self.fail is not None:
            raise self.fail
        return {"version": self.calls}


def make(clock: FakeClock, **options: Any) -> Cache:
    defaults: dict[str, Any] = {"ttl": 10.0, "jitter": 0.0, "beta": 0.0}
    return Cache(clock=clock, **{**defaults, **options})


async def test_a_miss_loads_and_a_hit_does_not() -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock)
    assert await cache.get_or_load("k", load) == {"version": 1}
    assert await cache.get_or_load("k", load) == {"version": 1}
    assert load.calls == 1
    clock.advance(10)
    assert await cache.get_or_load("k", load) == {"version": 2}


async def test_1000_concurrent_misses_share_one_load() -> None:
    clock, load = FakeClock(), Loader()
    load.gate = asyncio.Event()
    cache = make(clock)
    callers = [asyncio.create_task(cache.get_or_load("hot", load)) for _ in range(1000)]
    await asyncio.sleep(0)
    load.gate.set()
    results = await asyncio.gather(*callers)
    assert load.calls == 1
    assert all(r == {"version": 1} for r in results)


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    clock, load = FakeClock(), Loader()
    load.gate, load.fail = asyncio.Event(), RuntimeError("database down")
    cache = make(clock)
    callers = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(50)]
    await asyncio.sleep(0)
    load.gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert load.calls == 1
    load.fail = None
    assert await cache.get_or_load("k", load) == {"version": 2}


async def test_a_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    clock, load = FakeClock(), Loader()
    load.gate = asyncio.Event()
    cache = make(clock)
    impatient = asyncio.create_task(cache.get_or_load("k", load))
    patient = asyncio.create_task(cache.get_or_load("k", load))
    await asyncio.sleep(0)
    impatient.cancel()
    await asyncio.sleep(0)
    load.gate.set()
    assert await patient == {"version": 1}
    assert impatient.cancelled()
    assert load.calls == 1
    assert await cache.get("k") == {"version": 1}


async def test_stale_while_revalidate_serves_stale_and_refreshes_once() -> None:
    clock, load, recorder = FakeClock(), Loader(), Recorder()
    cache = make(clock, stale_while_revalidate=5.0, observer=recorder)
    await cache.get_or_load("k", load)
    clock.advance(11)  # expired, within the 5 s of stale-while-revalidate
    load.gate = asyncio.Event()
    stale = await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(20)))
    assert stale == [{"version": 1}] * 20  # served at once, stale
    assert load.calls == 2  # one background refresh for all twenty
    load.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await cache.get_or_load("k", load) == {"version": 2}
    assert len(recorder.of(StaleServed)) == 20
    assert [e.reason for e in recorder.of(CacheRefreshed)] == ["stale"]


async def test_a_finished_refresh_is_not_reused_by_a_later_miss() -> None:
    # A load that has just finished is still registered for one loop step (until its
    # done-callback runs): a miss in that step must start its own load.
    clock = FakeClock()
    cache = Cache(ttl=600, stale_while_revalidate=30, jitter=0, clock=clock)

    async def old() -> str:
        return "old"

    async def new() -> str:
        return "new"

    await cache.get_or_load("k", old)
    clock.advance(610)  # stale: a background refresh starts
    assert await cache.get_or_load("k", old) == "old"
    await asyncio.sleep(0)  # the refresh finishes; its callback has not run yet
    clock.advance(1000)  # expired, past every stale window
    assert await cache.get_or_load("k", new) == "new"


async def test_stale_if_error_serves_stale_only_within_its_bound() -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock, stale_if_error=30.0)
    await cache.get_or_load("k", load)
    load.fail = ConnectionError("down")
    clock.advance(20)
    assert await cache.get_or_load("k", load) == {"version": 1}  # stale, the loader failed
    clock.advance(25)  # 45 s after the set: beyond ttl + stale_if_error
    with pytest.raises(ConnectionError):
        await cache.get_or_load("k", load)


async def test_early_refresh_happens_before_expiry_exactly_once_under_concurrency() -> None:
    clock = FakeClock()
    load = Loader(clock, compute=2.0)  # a slow value: 2 s to compute
    cache = make(clock, beta=1.0, rng=random.Random(7))
    await cache.get_or_load("k", load)
    expires = clock.time() + 10 - 2  # the entry was stamped after the 2 s load
    refreshed_at = None
    while clock.time() < expires:
        clock.advance(0.25)
        reads = await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(50)))
        if load.calls > 1:
            refreshed_at = clock.time()
            assert all(r == {"version": 1} for r in reads)  # served the current value
            break
    assert refreshed_at is not None
    assert refreshed_at < expires  # early, before expiry
    await asyncio.sleep(0)
    assert load.calls == 2  # once, however many read meanwhile


async def test_ttl_jitter_spreads_expiries_below_the_ttl() -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock, jitter=0.2, rng=random.Random(1))
    for i in range(50):
        await cache.get_or_load(f"k{i}", load)
    clock.advance(7.99)
    alive = [await cache.get(f"k{i}") for i in range(50)]
    assert MISSING not in alive  # every one lives at least 8 s
    clock.advance(2.01)
    gone = [await cache.get(f"k{i}") for i in range(50)]
    assert gone == [MISSING] * 50  # and at most 10 s


async def test_none_is_cached_only_with_negative_ttl() -> None:
    clock, calls = FakeClock(), []

    async def not_found() -> None:
        calls.append(1)

    plain = make(clock)
    await plain.get_or_load("missing", not_found)
    await plain.get_or_load("missing", not_found)
    assert len(calls) == 2
    negative = make(clock, negative_ttl=1.0)
    await negative.get_or_load("missing", not_found)
    await negative.get_or_load("missing", not_found)
    assert len(calls) == 3
    clock.advance(1.0)
    await negative.get_or_load("missing", not_found)
    assert len(calls) == 4


async def test_tags_invalidate_every_value_set_with_them() -> None:
    clock = FakeClock()
    cache = make(clock)
    await cache.set("product:1", {"p": 1}, tags=["products", "brand:a"])
    await cache.set("product:2", {"p": 2}, tags=["products"])
    await cache.set("user:1", {"u": 1})
    await cache.invalidate_tags(["brand:a"])
    assert await cache.get("product:1") is MISSING
    assert await cache.get("product:2") == {"p": 2}
    await cache.invalidate_tags(["products"])
    assert await cache.get("product:2") is MISSING
    assert await cache.get("user:1") == {"u": 1}
    await cache.set("product:2", {"p": 3}, tags=["products"])  # set after: valid again
    assert await cache.get("product:2") == {"p": 3}
    await cache.delete("product:2")
    assert await cache.get("product:2") is MISSING


async def test_the_memory_store_is_bounded() -> None:
    clock = FakeClock()
    cache = Cache(MemoryBackend(max_keys=100), clock=clock, jitter=0.0)
    for i in range(250):
        await cache.set(f"k{i}", i)
    store = cache.store
    assert isinstance(store, MemoryCacheStore)
    assert len(store) == 100
    assert await cache.get("k249") == 249
    assert await cache.get("k0") is MISSING


async def test_cached_keys_and_tags_come_from_the_arguments() -> None:
    clock = FakeClock()
    cache = make(clock)
    calls: list[int] = []

    @cached(cache, key="product:{product_id}", tags=["products", "product:{product_id}"])
    async def product(product_id: int) -> dict[str, int]:
        calls.append(product_id)
        return {"id": product_id}

    assert await product(1) == {"id": 1}
    assert await product(1) == {"id": 1}
    assert await product(2) == {"id": 2}
    await cache.invalidate_tags(["product:1"])
    await product(1)
    assert calls == [1, 2, 1]


async def test_values_must_be_json_unless_another_serializer_is_given() -> None:
    clock = FakeClock()
    cache = make(clock)
    with pytest.raises(TypeError, match="cannot cache a set as JSON"):
        await cache.set("k", {1, 2})

    class Repr:
        def dumps(self, value: Any, /) -> bytes:
            return repr(sorted(value)).encode()

        def loads(self, data: bytes, /) -> Any:
            return {int(x) for x in data.decode().strip("[]").split(", ")}

    custom = make(clock, serializer=Repr())
    await custom.set("k", {1, 2})
    assert await custom.get("k") == {1, 2}


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="ttl must be"):
        Cache(ttl=0)
    with pytest.raises(ConfigurationError, match="jitter must be"):
        Cache(jitter=1.0)
    with pytest.raises(ConfigurationError, match="stale_if_error must be"):
        Cache(stale_if_error=-1)
    with pytest.raises(ConfigurationError, match="needs a MemoryBackend"):
        Cache(object())  # type: ignore[arg-type]
    import redis.asyncio

    from resilient import RedisBackend

    on_redis = Cache(RedisBackend(redis.asyncio.Redis()))
    with pytest.raises(TypeError, match="needs the memory backend"):

        @cached(on_redis, key="k")
        def sync() -> int:
            return 1

    with pytest.raises(ConfigurationError, match="need the memory backend"):
        on_redis.get_or_load_sync("k", lambda: 1)


def test_plain_functions_in_threads_share_one_load() -> None:
    import threading

    clock = FakeClock()
    cache = make(clock, stale_if_error=60.0)
    calls: list[int] = []
    gate = threading.Event()

    @cached(cache, key="rate:{currency}", tags=["rates"])
    def rate(currency: str) -> float:
        calls.append(1)
        gate.wait(5)
        if len(calls) > 1:
            raise ConnectionError("rates service down")
        return 1.08

    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(rate("EUR"))) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert results == [1.08] * 8
    assert calls == [1]
    clock.advance(11)  # expired: the loader fails, the stale value is served
    assert rate("EUR") == 1.08
    assert calls == [1, 1]
    clock.advance(60)  # beyond stale_if_error
    with pytest.raises(ConnectionError):
        rate("EUR")
