"""The cache on Redis, standalone and Cluster: one script per operation, tags as versions.

Every test runs on a standalone server and on the 3-master cluster, where a value and its
tags' versions live in different slots (and mostly on different nodes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import RedisBackend
from resilient.cache import MISSING, Cache
from resilient.cache.redis import RedisCacheStore
from resilient.testing import FakeClock, RedisCluster, RedisServer
from tests.cache.conftest import Gate, Loader, until


class Topology:
    """A backend on one topology, and a way to count what its servers ran."""

    def __init__(self, backend: RedisBackend, urls: list[str]) -> None:
        self.backend = backend
        self.urls = urls

    @property
    def client(self) -> Any:
        return self.backend.client

    def stats(self) -> dict[str, int]:
        """Calls run per command, over every server (scripts' own commands counted too).

        A call refused (``EVALSHA`` of a script not loaded yet: ``NOSCRIPT``) is not a run.
        """
        calls: dict[str, int] = {}
        for url in self.urls:
            node = redis.Redis.from_url(url)
            for name, stat in node.info("commandstats").items():
                ran = int(stat["calls"]) - int(stat.get("rejected_calls", 0))
                calls[name] = calls.get(name, 0) + ran - int(stat.get("failed_calls", 0))
            node.close()
        return calls

    def scripts(self) -> int:
        """How many scripts ran, over every server."""
        stats = self.stats()
        return stats.get("cmdstat_evalsha", 0) + stats.get("cmdstat_eval", 0)

    def keys(self) -> Iterator[tuple[str, int]]:
        """Every key on every server, with its TTL in seconds (-1: none)."""
        for url in self.urls:
            node = redis.Redis.from_url(url)
            for key in node.scan_iter():
                yield key.decode(), int(node.ttl(key))
            node.close()


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
async def topology(request: pytest.FixtureRequest) -> AsyncIterator[Topology]:
    client: Any
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        if not server.is_running:
            server.start()
        client = redis.asyncio.Redis.from_url(server.url)
        await client.flushall()
        urls = [server.url]
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        client = AsyncRedisCluster.from_url(cluster.url)
        await client.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
        urls = [node.url for node in cluster.servers]
    async with RedisBackend(client) as backend:
        yield Topology(backend, urls)
    await client.aclose()


def wall_clock() -> FakeClock:
    clock = FakeClock()
    clock.advance(1_700_000_000)  # a wall-clock time: Redis keeps the deadlines in ms
    return clock


async def test_tags_forget_every_value_stored_with_them(topology: Topology) -> None:
    cache = Cache(topology.backend, ttl=60, jitter=0.0)
    await cache.set("product:1", {"p": 1}, tags=["products", "brand:a"])
    await cache.set("product:2", {"p": 2}, tags=["products"])
    await cache.set("user:1", {"u": 1})
    assert await cache.invalidate_tags(["brand:a"]) is True
    assert await cache.get("product:1") is MISSING
    assert await cache.get("product:2") == {"p": 2}
    assert await cache.invalidate_tags(["products", "never-used"]) is True
    assert await cache.get("product:2") is MISSING
    assert await cache.get("user:1") == {"u": 1}
    await cache.set("product:2", {"p": 3}, tags=["products"])  # set after: valid again
    assert await cache.get("product:2") == {"p": 3}
    other = Cache(topology.backend, ttl=60, jitter=0.0)  # another instance sees the same
    assert await other.get("product:2") == {"p": 3}
    await other.invalidate_tags(["products"])
    assert await cache.get("product:2") is MISSING


async def test_get_or_load_loads_an_invalidated_value_once_again(topology: Topology) -> None:
    cache = Cache(topology.backend, ttl=60, jitter=0.0)
    load = Loader()
    results = await asyncio.gather(
        *(cache.get_or_load("product:1", load, tags=["p:1", "catalog"]) for _ in range(50))
    )
    assert results == [{"version": 1}] * 50
    assert await cache.get_or_load("product:1", load, tags=["p:1", "catalog"]) == {"version": 1}
    await cache.invalidate_tags(["catalog"])
    # The value is still there, fresh by its deadline: the read and the load's claim both
    # find its tag moved on, and load over it.
    results = await asyncio.gather(
        *(cache.get_or_load("product:1", load, tags=["p:1", "catalog"]) for _ in range(50))
    )
    assert results == [{"version": 2}] * 50
    assert load.calls == 2


async def test_a_tag_invalidated_while_its_value_loads_invalidates_what_it_stores(
    topology: Topology,
) -> None:
    cache = Cache(topology.backend, ttl=60, jitter=0.0)
    load = Loader()
    load.gate = Gate()
    loading = asyncio.ensure_future(cache.get_or_load("product:1", load, tags=["p:1"]))
    await until(lambda: load.calls == 1)
    assert await cache.invalidate_tags(["p:1"]) is True
    load.gate.set()
    assert await loading == {"version": 1}
    assert await cache.get("product:1") is MISSING
    load.gate = None
    assert await cache.get_or_load("product:1", load, tags=["p:1"]) == {"version": 2}
    assert await cache.get("product:1") == {"version": 2}


async def test_each_operation_is_one_script(topology: Topology) -> None:
    cache = Cache(topology.backend, ttl=60, jitter=0.0, beta=0.0)

    async def scripts(call: Any) -> int:
        before = topology.scripts()
        await call
        return topology.scripts() - before

    assert await scripts(cache.set("plain", 1)) == 1
    assert await scripts(cache.get("plain")) == 1
    assert await scripts(cache.get_or_load("plain", Loader())) == 1  # a hit: its read
    assert await scripts(cache.delete("plain")) == 1
    tags = [f"tag:{i}" for i in range(20)]
    assert await scripts(cache.set("tagged", 1, tags=tags)) == 2  # the versions, the value
    # However many tags, one script: they move on at once, for every reader.
    assert await scripts(cache.invalidate_tags(tags)) == 1
    await cache.set("tagged", 2, tags=tags)
    # A cluster reads the versions apart (after the value, for a get that names no tags;
    # at the same time, for a get_or_load that does).
    apart = 1 if topology.backend.is_cluster else 0
    assert await scripts(cache.get("tagged")) == 1 + apart
    assert await scripts(cache.get_or_load("tagged", Loader(), tags=tags)) == 1 + apart
    before = topology.scripts()
    assert await cache.get_or_load("miss", Loader(), tags=["t"]) == {"version": 1}
    assert topology.scripts() - before == 4 + apart  # read, claim, the versions, fill
    stats = topology.stats()
    assert not {"cmdstat_sadd", "cmdstat_smembers", "cmdstat_srem"} & set(stats)


async def test_a_missing_version_takes_its_values_along(topology: Topology) -> None:
    # A tag's version expired or was evicted: what was stored with it is never served
    # again (a new version is made, unlike any stamp).
    cache = Cache(topology.backend, ttl=60, jitter=0.0)
    await cache.set("product:1", {"p": 1}, tags=["catalog"])
    assert await cache.get("product:1") == {"p": 1}
    store = cache.store
    assert isinstance(store, RedisCacheStore)
    assert await topology.client.delete(store.tag_key("catalog")) == 1
    assert await cache.get("product:1") is MISSING
    load = Loader()
    assert await cache.get_or_load("product:1", load, tags=["catalog"]) == {"version": 1}
    assert await cache.get("product:1") == {"version": 1}


async def test_every_key_it_writes_expires(topology: Topology) -> None:
    clock = wall_clock()
    cache = Cache(topology.backend, ttl=60, jitter=0.0, clock=clock, stale_if_error=30)
    for i in range(50):
        await cache.set(f"product:{i}", i, tags=["catalog", f"p:{i}"])
        await cache.get_or_load(f"page:{i}", Loader(), tags=["catalog"])
    await cache.invalidate_tags(["catalog", "p:1"])
    await cache.delete("product:2")
    keys = dict(topology.keys())
    assert len(keys) >= 150  # values and versions
    assert [key for key, ttl in keys.items() if ttl < 0] == []
    store = cache.store
    assert isinstance(store, RedisCacheStore)
    # A tag's version lives at least as long as the values stored with it.
    value_ttl = keys[store.keys("page:49")[0]]
    assert keys[store.tag_key("catalog")] >= value_ttl
    assert keys[store.tag_key("p:49")] >= keys[store.keys("product:49")[0]]


async def test_no_lookup_or_load_state_remains(topology: Topology) -> None:
    cache = Cache(topology.backend, ttl=60)
    load = Loader()
    for i in range(0, 2_000, 200):
        await asyncio.gather(*(cache.get_or_load(f"k{j}", load) for j in range(i, i + 200)))
    assert load.calls == 2_000
    await asyncio.sleep(0)  # the done-callbacks of the last tasks
    assert cache.in_flight == 0


async def test_a_value_whose_stamps_name_other_tags_is_checked_against_them(
    topology: Topology,
) -> None:
    cache = Cache(topology.backend, ttl=60, jitter=0.0)
    load = Loader()
    assert await cache.get_or_load("page", load, tags=["a", "b"]) == {"version": 1}
    assert await cache.get_or_load("page", load, tags=["a"]) == {"version": 1}  # b: unnamed
    await cache.invalidate_tags(["b"])
    assert await cache.get_or_load("page", load, tags=["a"]) == {"version": 2}
    assert await cache.get_or_load("page", load, tags=["a", "c"]) == {"version": 2}
    await cache.invalidate_tags(["a"])
    assert await cache.get_or_load("page", load, tags=["a", "c"]) == {"version": 3}
    assert load.calls == 3


@pytest.mark.parametrize(
    "value",
    [
        b"v1|99999999999999999|99999999999999999|0|{}",  # the previous version's entry
        b"v2|99999999999999999|99999999999999999|0|zz:1|{}",  # stamps that are not stamps
        b'v2|99999999999999999|99999999999999999|0|ab:cd|"x"',  # a tag with no version
    ],
)
async def test_an_entry_it_cannot_trust_is_a_miss_that_is_overwritten(
    topology: Topology, value: bytes
) -> None:
    clock = wall_clock()
    cache = Cache(topology.backend, ttl=60, jitter=0.0, clock=clock)
    store = cache.store
    assert isinstance(store, RedisCacheStore)
    await topology.client.set(store.keys("k")[0], value, px=60_000)  # a foreign writer
    assert await cache.get("k") is MISSING
    load = Loader()
    assert await cache.get_or_load("k", load, tags=["t"]) == {"version": 1}
    assert await cache.get_or_load("k", load, tags=["t"]) == {"version": 1}
    assert await cache.get("k") == {"version": 1}
    assert load.calls == 1
