"""A retry budget shared by instances through a real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio

from resilient import BackendError, ConfigurationError, RedisBackend, RetryBudget
from resilient.testing import FakeClock, RedisServer


def budget(backend: RedisBackend, clock: FakeClock) -> RetryBudget:
    return RetryBudget(
        ratio=0.5, min_per_second=0, window=10.0, backend=backend, name="payments", clock=clock
    )


async def test_deposits_of_one_instance_fund_the_retries_of_another(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    a, b = budget(two_backends[0], clock), budget(two_backends[1], clock)
    await b.sync_now()
    assert b.balance == 0
    assert not b.try_withdraw()
    for _ in range(10):
        a.deposit()  # 10 calls on a: 5 tokens
    await a.sync_now()
    await b.sync_now()
    assert b.balance == 5
    assert [b.try_withdraw() for _ in range(6)] == [True] * 5 + [False]
    await b.sync_now()
    await a.sync_now()
    assert a.balance == 0  # b spent the shared tokens


async def test_shared_tokens_expire_with_the_window(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    a, b = budget(two_backends[0], clock), budget(two_backends[1], clock)
    for _ in range(4):
        a.deposit()
    await a.sync_now()
    clock.advance(10.5)
    await b.sync_now()
    assert b.balance == 0


async def test_without_redis_an_instance_falls_back_to_its_own_budget(
    fresh_redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        own = budget(backend, clock)
        await own.wait_for_sync()  # none in flight: nothing to wait for
        for _ in range(4):
            own.deposit()  # the first starts a sync in the background
        await own.wait_for_sync()
        fresh_redis_server.stop()
        with pytest.raises(BackendError):
            await own.sync_now()
        assert own.balance == 2  # its own deposits still count
        clock.advance(1.0)
        own.deposit()  # a new interval: a sync that fails, and waiting for it does not raise
        await own.wait_for_sync()
        assert own.balance == 2.5
        assert own.try_withdraw()
    await client.aclose()


def test_a_shared_budget_needs_a_name_and_a_redis_backend() -> None:
    backend = RedisBackend(redis.asyncio.Redis())
    with pytest.raises(ConfigurationError, match="needs a name"):
        RetryBudget(backend=backend)
    with pytest.raises(ConfigurationError, match="needs a RedisBackend"):
        RetryBudget(backend=object(), name="x")  # type: ignore[arg-type]


async def scripts_run(backend: RedisBackend) -> int:
    stats = await backend.client.info("commandstats")
    return sum(int(stats.get(k, {}).get("calls", 0)) for k in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_async_callers_sync_in_the_background_at_most_once_an_interval(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    a, b = budget(two_backends[0], clock), budget(two_backends[1], clock)
    before = await scripts_run(two_backends[0])
    for _ in range(10):
        a.deposit()  # the first starts a sync; the others fall in the same interval
    await a.wait_for_sync()  # the background sync (no waiting on time: it is awaited)
    assert await scripts_run(two_backends[0]) - before == 1
    clock.advance(1.0)
    a.deposit()  # a new interval: a second sync carries the deposits since the first
    await a.wait_for_sync()
    assert await scripts_run(two_backends[0]) - before == 2
    await b.sync_now()
    assert b.balance == 5.5
