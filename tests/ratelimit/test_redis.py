"""What only the Redis backend does: Redis time, scripts, batching, outages, processes."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import (
    BackendError,
    BackendUnavailable,
    RateLimiter,
    RedisBackend,
    SlidingWindow,
    TokenBucket,
)
from resilient.events import BackendFailed, Event
from resilient.testing import RedisCluster, RedisServer

pytestmark = pytest.mark.redis


async def test_without_a_clock_redis_time_decides_and_keys_expire(
    redis_client: redis.asyncio.Redis,
) -> None:
    async with RedisBackend(redis_client, prefix="app") as backend:
        decision = await RateLimiter(backend).hit("user:1", SlidingWindow("3/minute"))
    assert decision.allowed
    assert decision.remaining == 2
    assert 60 < decision.reset_after <= 120
    keys = [k async for k in redis_client.scan_iter("app:rl:*")]
    assert keys == [b"app:rl:{user:1}:sw:3:3:60000"]
    ttl = await redis_client.pttl(keys[0])
    # At least the rest of this window and the next (the weighted one), counted from the
    # hit: PTTL, read a moment later, may have ticked below 60 s when the hit came late in
    # a window.
    assert 59_000 < ttl <= 120_000


async def test_state_is_stored_as_integers(
    redis_client: redis.asyncio.Redis, redis_backend: RedisBackend
) -> None:
    limiter = RateLimiter(redis_backend)
    await limiter.hit("k", TokenBucket("3/second", burst=2))
    [key] = [k async for k in redis_client.scan_iter("resilient:rl:*")]
    raw = await redis_client.get(key)
    assert isinstance(raw, bytes)
    updated, debt, zero, blocked = (int(x) for x in raw.split())
    assert debt == 1000  # one token of 1000 ms, in units of 1/3 ms
    assert (zero, blocked) == (0, 0)
    assert updated > 1_600_000_000_000


async def test_checks_survive_script_flush(
    redis_client: redis.asyncio.Redis, redis_backend: RedisBackend
) -> None:
    limiter = RateLimiter(redis_backend, on_backend_error="closed")
    policy = SlidingWindow("5/hour")
    await limiter.hit("k", policy)
    await redis_client.script_flush()
    decision = await limiter.hit("k", policy)
    assert decision.remaining == 3
    assert not decision.degraded


async def test_concurrent_checks_are_coalesced_into_few_script_calls(
    redis_client: redis.asyncio.Redis, redis_backend: RedisBackend
) -> None:
    limiter = RateLimiter(redis_backend)
    await redis_client.config_resetstat()
    policy = TokenBucket("1000/hour")
    results = await asyncio.gather(*(limiter.hit(f"k{i % 7}", policy) for i in range(400)))
    assert all(d.allowed for d in results)
    stats = await redis_client.info("commandstats")
    calls = stats["cmdstat_evalsha"]["calls"] + stats.get("cmdstat_eval", {}).get("calls", 0)
    assert calls < 40, calls
    assert (await limiter.peek("k3", policy)).remaining == 1000 - len(range(3, 400, 7))


async def test_restart_mid_run_recovers(fresh_redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url)
    backend = RedisBackend(client)
    events: list[Event] = []
    limiter = RateLimiter(backend, observer=events.append)
    policy = SlidingWindow("100/hour")
    try:
        assert not (await limiter.hit("k", policy)).degraded
        fresh_redis_server.restart()  # scripts and data are gone, connections broken
        decisions = [await limiter.hit("k", policy) for _ in range(5)]
        assert not decisions[-1].degraded
        assert decisions[-1].allowed
        assert all(isinstance(e, BackendFailed) for e in events)
    finally:
        await backend.aclose()
        await client.aclose()


async def test_stopped_redis_fails_open_with_an_event(fresh_redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url)
    backend = RedisBackend(client)
    events: list[Event] = []
    limiter = RateLimiter(backend, observer=events.append)
    try:
        fresh_redis_server.stop()
        decision = await limiter.hit("k", SlidingWindow("1/hour"))
        assert decision.allowed
        assert decision.degraded
        [event] = events
        assert isinstance(event, BackendFailed)
        assert event.outcome == "admitted"
    finally:
        await backend.aclose()
        await client.aclose()


async def test_stopped_redis_fails_closed_when_configured(
    fresh_redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url)
    backend = RedisBackend(client)
    limiter = RateLimiter(backend, on_backend_error="closed", backend_retry_after=3)
    try:
        fresh_redis_server.stop()
        with pytest.raises(BackendUnavailable, match="unavailable") as raised:
            await limiter.hit("k", SlidingWindow("1/hour"))
        assert raised.value.retry_after == 3
    finally:
        await backend.aclose()
        await client.aclose()


async def test_a_hung_redis_times_out_into_the_policy(redis_client: redis.asyncio.Redis) -> None:
    async with RedisBackend(redis_client, timeout=0.05) as backend:
        limiter = RateLimiter(backend, on_backend_error="closed")
        await redis_client.client_pause(400, all=True)
        with pytest.raises(BackendUnavailable):
            await limiter.hit("k", SlidingWindow("1/hour"))


async def test_any_exception_escaping_the_client_is_a_backend_failure(
    redis_client: redis.asyncio.Redis,
) -> None:
    # redis-py's asyncio transports can let a connection failure out as AttributeError or
    # TypeError (redis/redis-py#4287): the failure policies must hold for those as well.
    async def leaky() -> None:
        msg = "'NoneType' object has no attribute 'writelines'"
        raise AttributeError(msg)

    async with RedisBackend(redis_client) as backend:
        with pytest.raises(BackendError, match="writelines") as raised:
            await backend.guard("writing", leaky())
        assert isinstance(raised.value.__cause__, AttributeError)

        async def cancelled() -> None:
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):  # cancellation is never a failure
            await backend.guard("waiting", cancelled())


def _hammer(url: str, cluster: bool, start: Any, hits: int, out: Any) -> None:
    async def main() -> int:
        client: Any = (
            AsyncRedisCluster.from_url(url) if cluster else redis.asyncio.Redis.from_url(url)
        )
        backend = RedisBackend(client)
        limiter = RateLimiter(backend, on_backend_error="closed")
        policies = (SlidingWindow("120/hour"), TokenBucket("1/hour", burst=150))
        await client.ping()
        start.wait()
        decisions = await asyncio.gather(*(limiter.hit("shared", *policies) for _ in range(hits)))
        await backend.aclose()
        await client.aclose()
        return sum(1 for d in decisions if d.allowed)

    out.put(asyncio.run(main()))


def _run_processes(url: str, *, cluster: bool) -> int:
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    workers = [
        context.Process(target=_hammer, args=(url, cluster, start, 100, out)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    admitted = sum(int(out.get(timeout=60)) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    return admitted


@pytest.mark.slow
def test_several_processes_admit_exactly_the_limit(redis_server: RedisServer) -> None:
    assert _run_processes(redis_server.url, cluster=False) == 120


@pytest.mark.slow
@pytest.mark.cluster
def test_several_processes_admit_exactly_the_limit_on_a_cluster(
    redis_cluster: RedisCluster,
) -> None:
    assert _run_processes(redis_cluster.url, cluster=True) == 120


def test_hash_tags_escape_braces_and_stay_distinct() -> None:
    from redis.crc import key_slot

    backend = RedisBackend(redis.asyncio.Redis())
    seen = set()
    for tag in ["}", "{", "a}b", "a%7Db", "{x}", "%", "plain"]:
        keys = [backend.key("rl", tag, suffix) for suffix in ("sw:1", "tb:2")]
        assert len({key_slot(k.encode()) for k in keys}) == 1
        inner = keys[0].split(":{", 1)[1].rsplit("}:", 1)[0]
        assert "{" not in inner
        assert "}" not in inner
        seen.add(inner)
    assert len(seen) == 7
