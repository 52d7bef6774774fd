"""Every rate-limit backend against the model, under concurrency, and through failures."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import (
    MemoryBackend,
    RateLimiter,
    RedisBackend,
    SlidingWindow,
    TokenBucket,
)
from resilient.ratelimit.core import Policy, combine
from resilient.testing import FakeClock, RedisCluster, RedisServer
from tests.ratelimit.model import model_check, model_of
from tests.ratelimit.strategies import Step, traces

BACKENDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=pytest.mark.cluster),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> MemoryBackend | RedisBackend:
    if request.param == "memory":
        return MemoryBackend()
    backend: RedisBackend = request.getfixturevalue(f"{request.param}_backend")
    return backend


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=traces())
async def test_backend_decides_like_the_model(
    backend: MemoryBackend | RedisBackend, trace: tuple[list[Policy], list[Step]]
) -> None:
    pool, steps = trace
    clock = FakeClock()
    limiter = RateLimiter(backend, clock=clock)
    key = uuid.uuid4().hex
    models = [model_of(p) for p in pool]
    for step in steps:
        clock.advance(step.advance_ms / 1000)
        now = math.floor(clock.time() * 1000)
        policies = [pool[i] for i in step.which]
        if step.action == "reset":
            await limiter.reset(key, *policies)
            for i in step.which:
                models[i] = model_of(pool[i])
            continue
        consume = step.action == "hit"
        if consume:
            decision = await limiter.hit(key, *policies, cost=step.cost)
        else:
            decision = await limiter.peek(key, *policies, cost=step.cost)
        expected = model_check([models[i] for i in step.which], now, step.cost, consume=consume)
        assert decision == combine(policies, expected), (step, now)


@pytest.mark.parametrize(
    "policy",
    [SlidingWindow("50/hour"), TokenBucket("50/hour"), TokenBucket("1/hour", burst=50)],
    ids=["sliding", "bucket", "burst"],
)
async def test_concurrent_hits_admit_exactly_the_limit(
    backend: MemoryBackend | RedisBackend, policy: Policy
) -> None:
    limiter = RateLimiter(backend)
    results = await asyncio.gather(*(limiter.hit("hot", policy) for _ in range(300)))
    assert sum(d.allowed for d in results) == 50
    remaining = sorted(d.remaining for d in results if d.allowed)
    assert remaining == list(range(50))  # every admitted hit saw a distinct count


async def test_concurrent_multi_policy_hits_charge_all_or_nothing(
    backend: MemoryBackend | RedisBackend,
) -> None:
    limiter = RateLimiter(backend)
    tight, loose = SlidingWindow("10/hour"), SlidingWindow("1000/hour")
    results = await asyncio.gather(*(limiter.hit("k", tight, loose) for _ in range(100)))
    assert sum(d.allowed for d in results) == 10
    after = await limiter.peek("k", loose)
    assert after.remaining == 990  # the 90 denied hits charged nothing


async def test_reset_forgets_usage(backend: MemoryBackend | RedisBackend) -> None:
    limiter = RateLimiter(backend)
    policy = SlidingWindow("2/hour")
    for _ in range(3):
        await limiter.hit("k", policy)
    assert not (await limiter.peek("k", policy)).allowed
    await limiter.reset("k", policy)
    assert (await limiter.hit("k", policy)).remaining == 1


async def test_keys_are_independent(backend: MemoryBackend | RedisBackend) -> None:
    limiter = RateLimiter(backend)
    policy = TokenBucket("1/hour")
    assert (await limiter.hit("a", policy)).allowed
    assert not (await limiter.hit("a", policy)).allowed
    assert (await limiter.hit("b", policy)).allowed


async def test_keys_with_braces_and_unicode_stay_in_one_slot(
    backend: MemoryBackend | RedisBackend,
) -> None:
    limiter = RateLimiter(backend)
    policies = (SlidingWindow("1/hour"), TokenBucket("5/hour"))
    for key in ["a}b{c", "{x}", "ключ", "with space", "}"]:
        assert (await limiter.hit(key, *policies)).allowed
        assert not (await limiter.hit(key, *policies)).allowed


async def test_on_the_backends_own_clock_a_block_lasts_exactly_its_length(
    backend: MemoryBackend | RedisBackend,
) -> None:
    # No clock given: the process's monotonic clock in memory, Redis TIME on Redis, whose
    # windows start at unrelated moments. The block must not depend on where they start:
    # one unit a second, blocked for a second, used to answer 1 s plus what was left of
    # the window.
    limiter = RateLimiter(backend)
    policy = SlidingWindow("1/second", block_for=1)
    assert (await limiter.hit("k", policy)).allowed
    denied = await limiter.hit("k", policy)
    assert (denied.allowed, denied.remaining, denied.retry_after) == (False, 0, 1.0)
    assert denied.reset_after == 1.0


@pytest.fixture(params=BACKENDS)
async def shared_backends(
    request: pytest.FixtureRequest,
) -> AsyncIterator[list[MemoryBackend] | list[RedisBackend]]:
    """Three backends on one store: three limiters of one process, or three processes'
    own clients of one Redis server or cluster (flushed first)."""
    if request.param == "memory":
        yield [MemoryBackend()] * 3
        return
    fixture = "redis_cluster" if request.param == "cluster" else "redis_server"
    server: RedisServer | RedisCluster = request.getfixturevalue(fixture)
    clients: list[Any] = [
        (AsyncRedisCluster if request.param == "cluster" else redis.asyncio.Redis).from_url(
            server.url
        )
        for _ in range(3)
    ]
    if request.param == "cluster":
        await clients[0].flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
    else:
        await clients[0].flushall()
    backends = [RedisBackend(client) for client in clients]
    yield backends
    for backend, client in zip(backends, clients, strict=True):
        await backend.aclose()
        await client.aclose()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=traces(), via=st.lists(st.integers(0, 2), min_size=40, max_size=40))
async def test_limiters_sharing_a_store_decide_like_one_model(
    shared_backends: list[MemoryBackend] | list[RedisBackend],
    trace: tuple[list[Policy], list[Step]],
    via: list[int],
) -> None:
    # Each step through one of three limiters, as requests reach one of several workers:
    # blocks, hits during them and their ends must be decided as by one model.
    pool, steps = trace
    clock = FakeClock()
    limiters = [RateLimiter(backend, clock=clock) for backend in shared_backends]
    key = uuid.uuid4().hex
    models = [model_of(p) for p in pool]
    for step, worker in zip(steps, via, strict=False):
        limiter = limiters[worker]
        clock.advance(step.advance_ms / 1000)
        now = math.floor(clock.time() * 1000)
        policies = [pool[i] for i in step.which]
        if step.action == "reset":
            await limiter.reset(key, *policies)
            for i in step.which:
                models[i] = model_of(pool[i])
            continue
        consume = step.action == "hit"
        if consume:
            decision = await limiter.hit(key, *policies, cost=step.cost)
        else:
            decision = await limiter.peek(key, *policies, cost=step.cost)
        expected = model_check([models[i] for i in step.which], now, step.cost, consume=consume)
        assert decision == combine(policies, expected), (step, worker, now)
