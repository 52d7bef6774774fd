"""What only the Redis backend does: Redis time, scripts, batching, outages, processes."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import (
    BackendUnavailable,
    RateLimiter,
    RedisBackend,
    SlidingWindow,
    TokenBucket,
)
from resilient.events import BackendFailed, Event
from resilient.testing import FakeClock, RedisCluster, RedisServer

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


# A 15-minute boundary, and moments after it: early in the window the sliding window's
# own wait (up to 1,080 s for 5/15minutes) used to outlast the 900 s block.
_BOUNDARY = 1_800_000_000 - 1_800_000_000 % 900


@pytest.mark.parametrize("phase", [0, 10, 100, 179, 180, 500, 899])
async def test_four_workers_on_one_redis_block_a_login_for_exactly_900_s(
    redis_server: RedisServer, phase: int
) -> None:
    # The shop: four workers, each with its own client and deny cache, one Redis, the
    # login rule; the attempts reach the workers in turn, a second apart.
    clock = FakeClock(start=_BOUNDARY + phase)
    clients = [redis.asyncio.Redis.from_url(redis_server.url) for _ in range(4)]
    await clients[0].flushall()
    backends = [RedisBackend(client, prefix="shop") for client in clients]
    workers = [RateLimiter(b, clock=clock, deny_cache=10_000) for b in backends]
    login = SlidingWindow("5/15minutes", block_for=900)
    try:
        admitted = [(await workers[i % 4].hit("login:alice", login)).allowed for i in range(5)]
        assert admitted == [True] * 5
        clock.advance(1)
        blocked = await workers[1].hit("login:alice", login)
        assert (blocked.allowed, blocked.retry_after, blocked.reset_after) == (False, 900, 900)
        for i, wait in enumerate([1, 7, 100, 333, 458]):  # hits during the block, everywhere
            clock.advance(wait)
            again = await workers[i % 4].hit("login:alice", login)
            assert not again.allowed
            assert again.retry_after == 900 - (clock.time() - (_BOUNDARY + phase + 1))
        clock.advance(1)  # the block's end: every worker admits, with a fresh quota
        after = [await worker.hit("login:alice", login) for worker in workers]
        assert [d.remaining for d in after if d.allowed] == [4, 3, 2, 1]
    finally:
        for backend, client in zip(backends, clients, strict=True):
            await backend.aclose()
            await client.aclose()


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


def _guess(url: str, start: Any, out: Any) -> None:
    async def main() -> list[float | None]:
        client = redis.asyncio.Redis.from_url(url)
        backend = RedisBackend(client, prefix="shop")
        limiter = RateLimiter(backend, deny_cache=10_000, on_backend_error="closed")
        login = SlidingWindow("1/second", block_for=1)
        await client.ping()
        start.wait()
        decisions = [await limiter.hit("login:alice", login) for _ in range(10)]
        await backend.aclose()
        await client.aclose()
        return [None if d.allowed else d.retry_after for d in decisions]

    out.put(asyncio.run(main()))


@pytest.mark.slow
def test_four_processes_on_redis_time_block_for_exactly_the_block(
    redis_server: RedisServer,
) -> None:
    # Four real workers, each with its deny cache, on Redis TIME: one unit a second,
    # blocked for a second. The denial that starts the block used to answer 1 s plus
    # what was left of Redis's current second; now every worker's wait is at most 1 s.
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    workers = [context.Process(target=_guess, args=(redis_server.url, start, out)) for _ in "1234"]
    for worker in workers:
        worker.start()
    start.set()
    answers = [a for _ in workers for a in out.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    waits = [a for a in answers if a is not None]
    assert len(waits) == len(answers) - 1  # one admitted, in all
    assert max(waits) == 1.0


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
