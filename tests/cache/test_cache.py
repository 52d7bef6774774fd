from __future__ import annotations

import asyncio
import functools
import gc
import random
import threading
from typing import Any

import pytest

from resilient import ConfigurationError, MemoryBackend
from resilient.cache import MISSING, Cache, cached
from resilient.cache.memory import MemoryCacheStore
from resilient.events import CacheMiss, CacheRefreshed, StaleServed
from resilient.testing import FakeClock, RecordingObserver
from tests.cache.conftest import Driver, Gate, Loader, until


def make(clock: FakeClock, **options: Any) -> Cache:
    defaults: dict[str, Any] = {"ttl": 10.0, "jitter": 0.0, "beta": 0.0}
    return Cache(clock=clock, **{**defaults, **options})


async def test_a_miss_loads_and_a_hit_does_not(driver: Driver) -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock)
    assert await driver.get_or_load(cache, "k", load) == {"version": 1}
    assert await driver.get_or_load(cache, "k", load) == {"version": 1}
    assert load.calls == 1
    clock.advance(10)
    assert await driver.get_or_load(cache, "k", load) == {"version": 2}


async def test_1000_concurrent_misses_share_one_load(driver: Driver) -> None:
    clock, load = FakeClock(), Loader()
    load.gate = Gate()
    cache = make(clock)
    callers = [asyncio.ensure_future(driver.get_or_load(cache, "hot", load)) for _ in range(1000)]
    await until(lambda: load.calls > 0)
    load.gate.set()
    results = await asyncio.gather(*callers)
    assert load.calls == 1
    assert all(r == {"version": 1} for r in results)


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached(driver: Driver) -> None:
    clock, load, recorder = FakeClock(), Loader(), RecordingObserver()
    load.gate, load.fail = Gate(), RuntimeError("database down")
    cache = make(clock, observer=recorder)
    callers = [asyncio.ensure_future(driver.get_or_load(cache, "k", load)) for _ in range(50)]
    await until(lambda: load.calls > 0 and len(recorder.of(CacheMiss)) == 50)
    # Every caller missed; give the threads among them the moment from their miss to the
    # load they join (one that came after the load had failed would load anew).
    await asyncio.sleep(0.05)
    load.gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert load.calls == 1
    load.fail = None
    assert await driver.get_or_load(cache, "k", load) == {"version": 2}


async def test_a_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    clock, load = FakeClock(), Loader()
    load.gate = Gate()
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


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(driver: Driver) -> None:
    clock, load, recorder = FakeClock(), Loader(), RecordingObserver()
    cache = make(clock, stale_while_revalidate=5.0, observer=recorder)
    await driver.get_or_load(cache, "k", load)
    clock.advance(11)  # expired, within the 5 s of stale-while-revalidate
    load.gate = Gate()
    stale = await asyncio.gather(*(driver.get_or_load(cache, "k", load) for _ in range(20)))
    assert stale == [{"version": 1}] * 20  # served at once, stale
    await until(lambda: load.calls > 1)  # the refresh runs in a task, or a thread
    assert load.calls == 2  # one background refresh for all twenty
    load.gate.set()
    await driver.settle(cache)
    assert load.calls == 2
    assert await driver.get_or_load(cache, "k", load) == {"version": 2}
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


async def test_stale_if_error_serves_stale_only_within_its_bound(driver: Driver) -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock, stale_if_error=30.0)
    await driver.get_or_load(cache, "k", load)
    load.fail = ConnectionError("down")
    clock.advance(20)
    assert await driver.get_or_load(cache, "k", load) == {"version": 1}  # stale, it failed
    clock.advance(25)  # 45 s after the set: beyond ttl + stale_if_error
    with pytest.raises(ConnectionError):
        await driver.get_or_load(cache, "k", load)


async def test_early_refresh_happens_before_expiry_exactly_once_under_concurrency(
    driver: Driver,
) -> None:
    clock, recorder = FakeClock(), RecordingObserver()
    load = Loader(clock, compute=2.0)  # a slow value: 2 s to compute
    cache = make(clock, beta=1.0, rng=random.Random(7), observer=recorder)
    await driver.get_or_load(cache, "k", load)
    expires = clock.time() + 10 - 2  # the entry was stamped after the 2 s load
    load.gate = Gate()  # the refresh waits here until the reads of its moment are served
    refreshed_at = None
    while clock.time() < expires:
        clock.advance(0.25)
        reads = await asyncio.gather(*(driver.get_or_load(cache, "k", load) for _ in range(50)))
        if recorder.of(CacheRefreshed):
            await until(lambda: load.calls > 1)  # the refresh runs in a task, or a thread
        if load.calls > 1:
            refreshed_at = clock.time()
            assert all(r == {"version": 1} for r in reads)  # served the current value
            break
    assert refreshed_at is not None
    assert refreshed_at < expires  # early, before expiry
    load.gate.set()
    await driver.settle(cache)
    assert load.calls == 2  # once, however many read meanwhile
    assert [e.reason for e in recorder.of(CacheRefreshed)] == ["early"]
    assert await driver.get_or_load(cache, "k", load) == {"version": 2}


async def test_ttl_jitter_spreads_expiries_below_the_ttl(driver: Driver) -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock, jitter=0.2, rng=random.Random(1))
    for i in range(50):
        await driver.get_or_load(cache, f"k{i}", load)
    clock.advance(7.99)
    alive = [await cache.get(f"k{i}") for i in range(50)]
    assert MISSING not in alive  # every one lives at least 8 s
    clock.advance(2.01)
    gone = [await cache.get(f"k{i}") for i in range(50)]
    assert gone == [MISSING] * 50  # and at most 10 s


async def test_none_is_cached_only_with_negative_ttl(driver: Driver) -> None:
    clock, calls = FakeClock(), []

    def not_found() -> None:
        calls.append(1)

    plain = make(clock)
    await driver.get_or_load(plain, "missing", not_found)
    await driver.get_or_load(plain, "missing", not_found)
    assert len(calls) == 2
    negative = make(clock, negative_ttl=1.0)
    await driver.get_or_load(negative, "missing", not_found)
    await driver.get_or_load(negative, "missing", not_found)
    assert len(calls) == 3
    clock.advance(1.0)
    await driver.get_or_load(negative, "missing", not_found)
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


async def test_cached_keys_and_tags_come_from_the_arguments(driver: Driver) -> None:
    clock = FakeClock()
    cache = make(clock)
    calls: list[int] = []

    @driver.cached(cache, key="product:{product_id}", tags=["products", "product:{product_id}"])
    def product(product_id: int) -> dict[str, int]:
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


async def test_no_state_per_key_remains_once_its_load_is_done(driver: Driver) -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock, stale_while_revalidate=5.0)
    for i in range(10_000):
        await driver.get_or_load(cache, f"k{i}", load)
    assert load.calls == 10_000
    assert cache.in_flight == 0
    clock.advance(12)  # stale: background refreshes, eight at a time
    for i in range(0, 1_000, 8):
        await asyncio.gather(*(driver.get_or_load(cache, f"k{j}", load) for j in range(i, i + 8)))
        await driver.settle(cache)
    assert load.calls == 11_000
    assert cache.in_flight == 0


async def test_a_tag_invalidated_while_its_value_loads_invalidates_what_it_stores(
    driver: Driver,
) -> None:
    clock, load = FakeClock(), Loader()
    cache = make(clock)
    load.gate = Gate()
    loading = asyncio.ensure_future(driver.get_or_load(cache, "product:1", load, tags=["p:1"]))
    await until(lambda: load.calls == 1)  # the loader has read the old row
    await cache.invalidate_tags(["p:1"])  # the row changed meanwhile
    load.gate.set()
    assert await loading == {"version": 1}  # the caller gets what it loaded ...
    assert await cache.get("product:1") is MISSING  # ... which nobody else is served
    load.gate = None
    assert await driver.get_or_load(cache, "product:1", load, tags=["p:1"]) == {"version": 2}
    assert await cache.get("product:1") == {"version": 2}


async def test_a_failing_refresh_leaves_the_value_served_and_tries_again(
    driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    clock, load, recorder = FakeClock(), Loader(), RecordingObserver()
    cache = make(clock, stale_while_revalidate=30.0, observer=recorder)
    await driver.get_or_load(cache, "k", load)
    clock.advance(11)
    load.fail = ConnectionError("down")
    assert await driver.get_or_load(cache, "k", load) == {"version": 1}
    await driver.settle(cache)  # the refresh failed in the background, quietly
    assert await driver.get_or_load(cache, "k", load) == {"version": 1}
    await driver.settle(cache)
    assert load.calls == 3  # each stale read after a failed refresh starts another
    load.fail = None
    assert await driver.get_or_load(cache, "k", load) == {"version": 1}
    await driver.settle(cache)
    assert await driver.get_or_load(cache, "k", load) == {"version": 4}
    assert [e.reason for e in recorder.of(CacheRefreshed)] == ["stale"] * 3
    gc.collect()  # a failure nobody waited for is retrieved, not left to the collector
    assert "never retrieved" not in caplog.text


def test_refresh_threads_are_one_per_key_and_bounded() -> None:
    clock, recorder = FakeClock(), RecordingObserver()
    cache = make(clock, stale_while_revalidate=60.0, observer=recorder)
    gate = threading.Event()
    running: list[str] = []

    def loader(key: str) -> Any:
        def load() -> str:
            running.append(key)
            gate.wait(30)
            return f"{key}:new"

        return load

    for i in range(20):
        cache.get_or_load_sync(f"k{i}", functools.partial(str, f"k{i}:old"))
    assert cache.in_flight == 0
    clock.advance(11)  # every value stale: each read starts a refresh, if it may
    for _ in range(3):
        for i in range(20):
            assert cache.get_or_load_sync(f"k{i}", loader(f"k{i}")) == f"k{i}:old"
    refreshed = [e.key for e in recorder.of(CacheRefreshed)]
    assert refreshed == [f"k{i}" for i in range(8)]  # 8 threads at once, one per key
    assert cache.in_flight == 8
    gate.set()
    for _ in range(1_000):  # bounded wait for the threads, not a timing assertion
        if cache.in_flight == 0:
            break
        threading.Event().wait(0.01)
    assert cache.in_flight == 0
    assert sorted(running) == sorted(f"k{i}" for i in range(8))
    assert cache.get_or_load_sync("k0", loader("k0")) == "k0:new"
    assert cache.get_or_load_sync("k19", loader("k19")) == "k19:old"  # refreshing now
