"""Breakers sharing their state through a real Redis (and Redis Cluster)."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import CircuitOpenError, ConfigurationError, RedisBackend
from resilient.breaker import CircuitBreaker, State
from resilient.breaker.redis import SharedBreakerStore
from resilient.events import BackendFailed
from resilient.testing import FakeClock, RecordingObserver, RedisCluster, RedisServer


class Boom(Exception):
    pass


def state(b: CircuitBreaker) -> State:
    return b.state


def make(backend: RedisBackend, clock: FakeClock, **options: Any) -> CircuitBreaker:
    defaults: dict[str, Any] = {
        "failure_rate": 0.5,
        "minimum_calls": 2,
        "window": 2,
        "open_for": 10.0,
        "sync_interval": 60.0,  # the tests sync by hand
    }
    return CircuitBreaker("payments", backend=backend, clock=clock, **{**defaults, **options})


def store(breaker: CircuitBreaker) -> SharedBreakerStore:
    shared = breaker.shared_store
    assert shared is not None
    return shared


async def evalsha_calls(client: Any) -> int:
    """How many EVALSHA commands the server has run."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def trip(breaker: CircuitBreaker) -> None:
    @breaker
    async def fail() -> None:
        raise Boom

    for _ in range(2):
        with pytest.raises(Boom):
            await fail()
    assert state(breaker) is State.OPEN


async def ok() -> str:
    return "ok"


async def test_an_open_on_one_instance_opens_the_others_and_one_probes(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    client = two_backends[0].client
    before = await evalsha_calls(client)
    a, b = (make(backend, clock, half_open_calls=2) for backend in two_backends)
    for _ in range(500):  # bounded: each background task reads once as it starts
        if await evalsha_calls(client) >= before + 2:
            break
        await asyncio.sleep(0.01)
    await trip(a)
    await store(a).sync_now()  # publishes the opening
    assert await b.call(ok) == "ok"  # b has not synced yet: it still decides alone
    await store(b).sync_now()
    assert state(b) is State.OPEN
    with pytest.raises(CircuitOpenError):
        await b.call(ok)

    clock.advance(10)  # the open period is over, for both
    await store(b).sync_now()
    await store(a).sync_now()
    assert await b.call(ok) == "ok"  # b's call claims the probe lease: probe 1 of 2
    with pytest.raises(CircuitOpenError):
        await a.call(ok)  # a is told to wait for b's probes
    assert await b.call(ok) == "ok"  # the probes succeed: b closes, and publishes it
    assert state(b) is State.CLOSED
    await store(b).sync_now()
    await store(a).sync_now()
    assert state(a) is State.CLOSED
    assert await a.call(ok) == "ok"


async def test_a_failed_probe_reopens_for_everyone(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock, half_open_calls=1) for backend in two_backends)
    await trip(a)
    await store(a).sync_now()
    clock.advance(10)
    await store(a).sync_now()  # a probes
    await store(b).sync_now()

    @a
    async def fail() -> None:
        raise Boom

    with pytest.raises(Boom):
        await fail()
    assert state(a) is State.OPEN
    await store(a).sync_now()
    clock.advance(5)
    await store(b).sync_now()
    assert state(b) is State.OPEN
    with pytest.raises(CircuitOpenError) as raised:
        await b.call(ok)
    assert raised.value.retry_after == pytest.approx(5.0)


async def test_without_redis_each_instance_decides_alone(
    fresh_redis_server: RedisServer,
) -> None:
    clock, recorder = FakeClock(), RecordingObserver()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        a = make(backend, clock, observer=recorder)
        await trip(a)
        fresh_redis_server.stop()
        await store(a).sync_now()  # cannot publish: reported, and a goes on alone
        clock.advance(10)
        assert await a.call(ok) == "ok"  # half-open locally, probe succeeded
        assert state(a) is State.CLOSED
    await client.aclose()
    failures = [e for e in recorder.events if isinstance(e, BackendFailed)]
    assert [e.outcome for e in failures] == ["deciding locally"]


async def test_successful_calls_send_no_redis_command(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    a = make(two_backends[0], clock, window=100, minimum_calls=100)
    await store(a).sync_now()
    await asyncio.sleep(0)  # let the background task take its first turn
    client = two_backends[0].client
    before = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    for _ in range(1000):
        await a.call(ok)
    after = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert after == before


async def test_the_background_task_spreads_an_opening(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock, sync_interval=0.05) for backend in two_backends)
    assert await b.call(ok) == "ok"  # b's task is running
    await trip(a)  # a's task publishes at once
    for _ in range(200):  # bounded: b's task reads every 50 ms
        if state(b) is State.OPEN:
            break
        await asyncio.sleep(0.01)
    assert state(b) is State.OPEN


def test_a_name_shares_a_backend_once() -> None:
    backend = RedisBackend(redis.asyncio.Redis())
    CircuitBreaker("dup", backend=backend)
    with pytest.raises(ConfigurationError, match="already shares"):
        CircuitBreaker("dup", backend=backend)
    with pytest.raises(ConfigurationError, match="sync_interval"):
        CircuitBreaker("other", backend=backend, sync_interval=0)
    with pytest.raises(ConfigurationError, match="needs a RedisBackend"):
        CircuitBreaker("other", backend=object())  # type: ignore[arg-type]


@pytest.mark.cluster
async def test_shared_state_on_a_cluster(redis_cluster: RedisCluster) -> None:
    clock = FakeClock()
    one = AsyncRedisCluster.from_url(redis_cluster.url)
    two = AsyncRedisCluster.from_url(redis_cluster.url)
    await one.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
    async with RedisBackend(one) as x, RedisBackend(two) as y:
        a, b = make(x, clock), make(y, clock)
        await trip(a)
        await store(a).sync_now()
        await store(b).sync_now()
        assert state(b) is State.OPEN
    await one.aclose()
    await two.aclose()


def _instance(url: str, role: str, tripped: Any, done: Any, out: Any) -> None:
    async def main() -> str:
        client = redis.asyncio.Redis.from_url(url)
        async with RedisBackend(client) as backend:
            breaker = CircuitBreaker(
                "shared-dep",
                backend=backend,
                failure_rate=0.5,
                minimum_calls=2,
                window=2,
                open_for=600.0,
                sync_interval=60.0,
            )
            if role == "tripper":
                await trip(breaker)
                await store(breaker).sync_now()
                tripped.set()
                result = breaker.state.value
            else:
                assert await breaker.call(ok) == "ok"
                await asyncio.get_running_loop().run_in_executor(None, tripped.wait, 60)
                await store(breaker).sync_now()
                try:
                    await breaker.call(ok)
                    result = "admitted"
                except CircuitOpenError as exc:
                    result = f"rejected {exc.retry_after > 500}"
        await client.aclose()
        return result

    out.put((role, asyncio.run(main())))
    done.set()


@pytest.mark.slow
def test_two_processes_share_one_opening(redis_server: RedisServer) -> None:
    if not redis_server.is_running:
        redis_server.start()
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_server.url).flushall()
    context = multiprocessing.get_context("spawn")
    tripped, done, out = context.Event(), context.Event(), context.Queue()
    processes = [
        context.Process(target=_instance, args=(redis_server.url, role, tripped, done, out))
        for role in ("tripper", "follower")
    ]
    for process in processes:
        process.start()
    results = dict(out.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert results == {"tripper": "open", "follower": "rejected True"}
