"""Entries the cache cannot read are misses: the loader runs, the entry is overwritten and
an event says so; never an exception out of the cache."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

from resilient import MemoryBackend, RedisBackend
from resilient.cache import MISSING, Cache, cached
from resilient.cache.core import JSONSerializer
from resilient.cache.redis import RedisCacheStore
from resilient.events import CacheEntryInvalid, CacheLockWait, CacheMiss, StaleServed
from resilient.testing import FakeClock, RecordingObserver, RedisServer
from tests.cache.conftest import Driver

# What a foreign writer leaves: a pickle, a truncated value, bytes that are not UTF-8,
# JSON's non-standard constants (the cache's JSON never writes them).
BODIES = [
    pickle.dumps({"a": 1}),
    b'{"a": [1, 2',
    b"\xff\xfe\x00garbage",
    b"NaN",
    b"",
]


class Foreign:
    """A serialiser of another writer: whatever bytes it is told to write."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def dumps(self, value: Any, /) -> bytes:
        return self.body

    def loads(self, data: bytes, /) -> Any:
        return data


def test_the_json_serializer_refuses_what_it_never_writes() -> None:
    serializer = JSONSerializer()
    for body in BODIES:
        with pytest.raises(ValueError):  # noqa: PT011 (JSONDecodeError, UnicodeDecodeError...)
            serializer.loads(body)


# --- memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("body", BODIES)
async def test_a_foreign_entry_in_memory_is_a_miss_that_is_overwritten(
    body: bytes, driver: Driver
) -> None:
    clock, seen = FakeClock(), RecordingObserver()
    backend = MemoryBackend()
    await Cache(backend, clock=clock, serializer=Foreign(body)).set("product:1", "x")
    cache = Cache(backend, clock=clock, jitter=0.0, observer=seen)
    assert await cache.get("product:1") is MISSING
    loads: list[int] = []

    def load() -> dict[str, int]:
        loads.append(1)
        return {"p": 1}

    assert await driver.get_or_load(cache, "product:1", load) == {"p": 1}
    assert await driver.get_or_load(cache, "product:1", load) == {"p": 1}
    assert loads == [1]  # overwritten: the second call is a hit
    invalid = seen.of(CacheEntryInvalid)
    assert [(e.key, e.reason) for e in invalid] == [("product:1", "body")] * 2
    assert len(seen.of(CacheMiss)) == 1


async def test_a_foreign_entry_is_never_served_stale(driver: Driver) -> None:
    clock, seen = FakeClock(), RecordingObserver()
    backend = MemoryBackend()
    options: dict[str, Any] = {"ttl": 10.0, "stale_while_revalidate": 60.0, "stale_if_error": 60.0}
    await Cache(backend, clock=clock, serializer=Foreign(b"\x80\x04"), **options).set("k", "x")
    clock.advance(20)  # stale now: would be served while revalidating, or on error
    cache = Cache(backend, clock=clock, jitter=0.0, observer=seen, **options)

    def load() -> str:
        return "fresh"

    assert await driver.get_or_load(cache, "k", load) == "fresh"
    assert seen.of(StaleServed) == []

    await Cache(backend, clock=clock, serializer=Foreign(b"\x80\x04"), **options).set("k", "x")
    clock.advance(20)

    def fail() -> str:
        raise LookupError("the database is down")

    with pytest.raises(LookupError):  # the loader's error, not a UnicodeDecodeError
        await driver.get_or_load(cache, "k", fail)
    assert seen.of(StaleServed) == []


async def test_the_decorators_and_the_sync_form_treat_it_as_a_miss() -> None:
    clock, seen = FakeClock(), RecordingObserver()
    backend = MemoryBackend()
    foreign = Cache(backend, clock=clock, serializer=Foreign(b"\x80\x04\x95"))
    cache = Cache(backend, clock=clock, jitter=0.0, observer=seen)

    @cached(cache, key="a:{n}")
    async def a(n: int) -> int:
        return n * 2

    @cached(cache, key="s:{n}")
    def s(n: int) -> int:
        return n * 3

    await foreign.set("a:1", 0)
    await foreign.set("s:1", 0)
    assert await a(1) == 2
    assert s(1) == 3
    assert s(1) == 3  # overwritten
    assert cache.get_or_load_sync("s:1", lambda: 0) == 3
    assert [e.key for e in seen.of(CacheEntryInvalid)] == ["a:1", "s:1"]


# --- Redis ---------------------------------------------------------------------------------


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    if not redis_server.is_running:
        redis_server.start()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


def header(clock: FakeClock, fresh: float = 60.0, stale: float = 60.0) -> bytes:
    now_ms = int(clock.time() * 1000)
    return b"v2|%d|%d|0||" % (now_ms + int(fresh * 1000), now_ms + int((fresh + stale) * 1000))


async def write(raw: redis.asyncio.Redis, backend: RedisBackend, key: str, value: bytes) -> None:
    """Write *value* where the cache keeps *key*, with a raw client: a foreign writer."""
    name = RedisCacheStore(backend).keys(key)[0]
    await raw.set(name, value, px=120_000)


async def stored(raw: redis.asyncio.Redis, backend: RedisBackend, key: str) -> bytes:
    value = await raw.get(RedisCacheStore(backend).keys(key)[0])
    assert isinstance(value, bytes)
    return value


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("l1", [0, 8])
async def test_foreign_bytes_on_redis_are_a_miss_that_is_overwritten(
    raw: redis.asyncio.Redis, body: bytes, l1: int
) -> None:
    clock, seen = FakeClock(), RecordingObserver()
    clock.advance(1_700_000_000)  # a wall-clock time: Redis keeps the deadlines in ms
    async with RedisBackend(raw) as backend:
        cache = Cache(backend, clock=clock, jitter=0.0, observer=seen, l1=l1, max_wait=30.0)
        await write(raw, backend, "product:1", header(clock) + body)
        assert await cache.get("product:1") is MISSING
        loads: list[int] = []

        async def load() -> dict[str, int]:
            loads.append(1)
            return {"p": 1}

        assert await cache.get_or_load("product:1", load) == {"p": 1}
        assert (await stored(raw, backend, "product:1")).endswith(b'|{"p":1}')
        assert await cache.get_or_load("product:1", load) == {"p": 1}
        assert loads == [1]
        assert seen.of(CacheLockWait) == []  # no wait on a lock nobody holds
        assert {(e.key, e.reason) for e in seen.of(CacheEntryInvalid)} == {("product:1", "body")}
        await cache.aclose()


@pytest.mark.parametrize(
    "value",
    [
        b"v2|1|2|3|{}",  # no stamps
        b"v1|99999999999999|99999999999999|0|{}",  # the previous version's entry
        b"v9|99999999999999|99999999999999|0||{}",  # another version
        b"v1|notanumber|2|3|{}",
        b"v2|notanumber|2|3||{}",
        b"v1|99999999999999|x|0|{}",
        b"v2|99999999999999|x|0||{}",  # looks fresh to the claim script; unreadable
        b"v2|99999999999999|99999999999999|0|zz:1|{}",  # stamps that are not stamps
        b"v1|99999999999999|99999999999999|0",  # no body
        b"v2|99999999999999|99999999999999|0|",  # no body
        pickle.dumps("a foreign writer"),
    ],
)
async def test_a_bad_header_on_redis_is_a_miss_that_is_overwritten(
    raw: redis.asyncio.Redis, value: bytes
) -> None:
    clock, seen = FakeClock(), RecordingObserver()
    clock.advance(1_700_000_000)
    async with RedisBackend(raw) as backend:
        cache = Cache(backend, clock=clock, jitter=0.0, observer=seen, max_wait=30.0)
        await write(raw, backend, "k", value)
        assert await cache.get("k") is MISSING

        async def load() -> str:
            return "v"

        assert await cache.get_or_load("k", load) == "v"
        assert (await stored(raw, backend, "k")).endswith(b'|"v"')
        assert seen.of(CacheLockWait) == []
        assert {(e.key, e.reason) for e in seen.of(CacheEntryInvalid)} == {("k", "header")}


async def test_the_in_process_tier_never_keeps_an_entry_it_cannot_read(
    raw: redis.asyncio.Redis,
) -> None:
    clock, seen = FakeClock(), RecordingObserver()
    clock.advance(1_700_000_000)
    async with RedisBackend(raw) as backend:
        cache = Cache(backend, clock=clock, jitter=0.0, observer=seen, l1=8)
        await cache.get("warm-up")  # starts the tier's subscription
        l1 = cache.l1
        assert l1 is not None
        for _ in range(500):  # bounded wait for the subscription, not a timing assertion
            if l1.listening:
                break
            await asyncio.sleep(0.01)
        assert l1.listening
        await write(raw, backend, "k", header(clock) + b"\x80\x04not json")

        async def load() -> str:
            return "v"

        assert await cache.get_or_load("k", load) == "v"
        held = l1.get("k", clock.time())
        assert held is not None
        assert held.data == b'"v"'  # the loaded value, not the foreign bytes
        assert {e.key for e in seen.of(CacheEntryInvalid)} == {"k"}  # each read that met it
        await cache.aclose()
