"""The in-process tier in front of Redis, kept coherent by pub/sub between instances."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from resilient import ConfigurationError, MemoryBackend, RedisBackend
from resilient.cache import Cache


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a pub/sub message to arrive: bounded, not a timing assertion."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def gets(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def test_hits_from_the_in_process_tier_cost_no_redis_command(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    cache = Cache(two_backends[0], l1=100, jitter=0.0)
    loads: list[int] = []

    async def load() -> dict[str, int]:
        loads.append(1)
        return {"v": 1}

    await cache.get_or_load("k", load)
    assert cache.l1 is not None
    l1 = cache.l1
    await until(lambda: l1.listening)
    await cache.get_or_load("k", load)  # from Redis, now kept in process
    before = await gets(two_backends[0].client)
    for _ in range(100):
        assert await cache.get_or_load("k", load) == {"v": 1}
    assert await gets(two_backends[0].client) == before
    assert loads == [1]
    await cache.aclose()


async def test_a_write_on_one_instance_drops_the_others_copy(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    a, b = Cache(two_backends[0], l1=100, jitter=0.0), Cache(two_backends[1], l1=100, jitter=0.0)
    await a.set("product:1", {"price": 10}, tags=["products"])
    assert b.l1 is not None
    b_l1 = b.l1
    await b.get("product:1")  # starts b's subscription
    await until(lambda: b_l1.listening)
    assert await b.get("product:1") == {"price": 10}
    assert len(b_l1) == 1
    await a.set("product:1", {"price": 12})
    await until(lambda: len(b_l1) == 0)
    assert await b.get("product:1") == {"price": 12}
    await until(lambda: len(b_l1) == 1)
    await a.invalidate_tags(["products"])
    await until(lambda: len(b_l1) == 0)
    await a.aclose()
    await b.aclose()


def test_the_tier_needs_redis_and_a_sane_size() -> None:
    with pytest.raises(ConfigurationError, match="in front of a RedisBackend"):
        Cache(MemoryBackend(), l1=10)
    with pytest.raises(ConfigurationError, match="l1 must be"):
        Cache(l1=-1)
