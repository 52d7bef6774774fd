"""Every rate-limit backend against the model, under concurrency, and through failures."""

from __future__ import annotations

import asyncio
import math
import uuid

import pytest
from hypothesis import HealthCheck, given, settings

from resilient import (
    MemoryBackend,
    RateLimiter,
    RedisBackend,
    SlidingWindow,
    TokenBucket,
)
from resilient.ratelimit.core import Policy, combine
from resilient.testing import FakeClock
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
