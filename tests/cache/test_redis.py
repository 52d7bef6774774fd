"""The cache on a real Redis: one load across processes, woken waiters, takeover."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import RedisBackend
from resilient.cache import MISSING, Cache
from resilient.events import BackendFailed, Event
from resilient.testing import RedisCluster, RedisServer


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    if not redis_server.is_running:
        redis_server.start()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await client.flushall()
    async with RedisBackend(client) as b:
        yield b
    await client.aclose()


async def test_get_or_load_set_delete_and_tags_on_redis(backend: RedisBackend) -> None:
    cache = Cache(backend, ttl=60, jitter=0.0)
    calls: list[int] = []

    async def load() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    results = await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(100)))
    assert results == [{"n": 1}] * 100
    assert len(calls) == 1
    await cache.set("product:1", {"p": 1}, tags=["products"])
    assert await cache.get("product:1") == {"p": 1}
    await cache.invalidate_tags(["products"])
    assert await cache.get("product:1") is MISSING
    await cache.delete("k")
    assert await cache.get("k") is MISSING


def _process(url: str, cluster: bool, start: Any, out: Any) -> None:
    async def main() -> tuple[list[Any], int]:
        client: Any = (
            AsyncRedisCluster.from_url(url) if cluster else redis.asyncio.Redis.from_url(url)
        )
        async with RedisBackend(client) as backend:
            cache = Cache(backend, ttl=60)

            async def load() -> dict[str, str]:
                await client.incr("test:loads")  # counted where every process can see it
                await asyncio.sleep(0.05)  # a 50 ms query
                return {"product": "hot"}

            await client.ping()
            start.wait()
            results = await asyncio.gather(
                *(cache.get_or_load("product:1", load) for _ in range(250))
            )
        await client.aclose()
        return results, len(results)

    results, count = asyncio.run(main())
    out.put((all(r == {"product": "hot"} for r in results), count))


def _stampede(url: str, *, cluster: bool) -> list[tuple[bool, int]]:
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    processes = [
        context.Process(target=_process, args=(url, cluster, start, out)) for _ in range(4)
    ]
    for process in processes:
        process.start()
    start.set()
    results = [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return results


def _commands(client: Any) -> int:
    stats = client.info("commandstats")
    return sum(
        int(v["calls"])
        for k, v in stats.items()
        if k not in ("cmdstat_info", "cmdstat_config|resetstat")
    )


@pytest.mark.slow
def test_1000_misses_over_4_processes_load_once_without_polling(redis_server: RedisServer) -> None:
    if not redis_server.is_running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.config_resetstat()
    results = _stampede(redis_server.url, cluster=False)
    assert results == [(True, 250)] * 4
    assert int(client.get("test:loads") or 0) == 1
    # Each process sends a handful of commands (claim, a wait, claim again; the loader's
    # lock and fill), whatever its 250 callers: far from a polling storm.
    assert _commands(client) <= 100
    client.close()


@pytest.mark.slow
@pytest.mark.cluster
def test_the_same_on_a_cluster(redis_cluster: RedisCluster) -> None:
    from redis.cluster import RedisCluster as SyncRedisCluster

    client = SyncRedisCluster.from_url(redis_cluster.url)
    client.flushall(target_nodes=SyncRedisCluster.PRIMARIES)
    results = _stampede(redis_cluster.url, cluster=True)
    assert results == [(True, 250)] * 4
    assert int(client.get("test:loads") or 0) == 1
    client.close()


def _dying_owner(url: str, claimed: Any) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(url)
        async with RedisBackend(client) as backend:
            cache = Cache(backend, lock_lease=0.5)

            async def load() -> str:
                claimed.set()
                os._exit(1)  # the process dies in the middle of its load

            await cache.get_or_load("k", load)

    asyncio.run(main())


@pytest.mark.slow
async def test_another_process_takes_over_when_the_owner_dies(
    backend: RedisBackend, redis_server: RedisServer
) -> None:
    server_url = redis_server.url
    context = multiprocessing.get_context("spawn")
    claimed = context.Event()
    owner = context.Process(target=_dying_owner, args=(server_url, claimed))
    owner.start()
    await asyncio.get_running_loop().run_in_executor(None, claimed.wait, 30)
    owner.join(timeout=30)
    assert owner.exitcode == 1
    cache = Cache(backend, lock_lease=0.5, max_wait=5.0)
    calls: list[int] = []

    async def load() -> str:
        calls.append(1)
        return "loaded after the takeover"

    assert await cache.get_or_load("k", load) == "loaded after the takeover"
    assert calls == [1]


async def test_a_loader_error_reaches_the_waiting_processes(backend: RedisBackend) -> None:
    one = Cache(backend, max_wait=5.0)
    two = Cache(backend, max_wait=5.0)  # another instance, as if in another process
    gate = asyncio.Event()

    async def failing() -> str:
        await gate.wait()
        raise LookupError("no such product")

    async def second() -> str:
        return "second loads after the failure"

    waits: list[Event] = []
    two.observer = waits.append
    first = asyncio.create_task(one.get_or_load("k", failing))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(two.get_or_load("k", second))
    await asyncio.sleep(0.05)
    gate.set()
    with pytest.raises(LookupError, match="no such product"):
        await first
    # woken by the failed owner, the waiter claims the lock and loads itself
    assert await waiting == "second loads after the failure"
    assert "CacheLockWait" in [type(e).__name__ for e in waits]


async def test_redis_down_loads_directly(fresh_redis_server: RedisServer) -> None:
    events: list[Event] = []
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        cache = Cache(backend, observer=events.append)
        fresh_redis_server.stop()

        async def load() -> str:
            return "straight from the database"

        assert await cache.get_or_load("k", load) == "straight from the database"
    await client.aclose()
    assert {e.operation for e in events if isinstance(e, BackendFailed)} >= {"get", "load"}
