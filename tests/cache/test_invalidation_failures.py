"""Deletes and tag invalidations when the backend fails: reported, remembered, retried.

A failed invalidation is never silent and never lost while this process runs: the call
returns ``False`` (or raises ``BackendError`` when asked), a ``BackendFailed`` event says
so, and the invalidation is retried before this cache next reaches the backend, so this
process never serves the value it meant to forget. Faults are real: ``CLIENT PAUSE`` on a
real Redis, or the server stopped.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio

from resilient import ConfigurationError, MemoryBackend, RedisBackend
from resilient.cache import MISSING, Cache
from resilient.errors import BackendError
from resilient.events import BackendFailed, Event
from resilient.testing import RedisServer

PAUSE_MS = 600  # the stall: longer than the client's socket timeout


def pause(url: str, milliseconds: int = PAUSE_MS) -> None:
    """Stall every client of the server for *milliseconds* (a blocked server, a failover)."""
    admin = redis.Redis.from_url(url)
    admin.client_pause(milliseconds, all=True)
    admin.close()


async def after_pause() -> None:
    await asyncio.sleep(PAUSE_MS / 1000 + 0.15)


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    if not redis_server.is_running:
        redis_server.start()
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    admin.close()
    return redis_server


def client_of(url: str) -> Any:
    return redis.asyncio.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)


def failures(events: list[Event]) -> list[BackendFailed]:
    return [e for e in events if isinstance(e, BackendFailed)]


async def test_a_delete_that_fails_is_reported_and_done_when_redis_is_back(
    server: RedisServer,
) -> None:
    events: list[Event] = []
    client, other_client = client_of(server.url), client_of(server.url)
    async with RedisBackend(client) as backend, RedisBackend(other_client) as other_backend:
        cache = Cache(backend, ttl=600, observer=events.append)
        other = Cache(other_backend, ttl=600)  # another process of the service
        await cache.set("product:1", {"stock": 5})
        pause(server.url)
        assert await cache.delete("product:1") is False
        [failed] = failures(events)
        assert (failed.block, failed.operation, failed.outcome) == (
            "cache",
            "delete",
            "retried later",
        )
        assert isinstance(failed.error, BackendError)
        assert cache.pending_invalidations == 1
        await after_pause()
        # This process never reads the value it meant to forget: the delete goes first.
        assert await cache.get("product:1") is MISSING
        assert cache.pending_invalidations == 0
        assert await other.get("product:1") is MISSING  # it reached Redis
    await client.aclose()
    await other_client.aclose()


async def test_a_tag_invalidation_that_fails_is_reported_and_done_when_redis_is_back(
    server: RedisServer,
) -> None:
    events: list[Event] = []
    client, other_client = client_of(server.url), client_of(server.url)
    async with RedisBackend(client) as backend, RedisBackend(other_client) as other_backend:
        cache = Cache(backend, ttl=600, observer=events.append)
        other = Cache(other_backend, ttl=600)
        await cache.set("page:1", ["a", "b"], tags=["catalog"])
        await cache.set("page:2", ["c"], tags=["catalog"])
        pause(server.url)
        assert await cache.invalidate_tags(["catalog"]) is False
        assert [(e.operation, e.outcome) for e in failures(events)] == [
            ("invalidate", "retried later")
        ]
        await after_pause()
        loads: list[str] = []

        async def load() -> list[str]:
            loads.append("page:1")
            return ["fresh"]

        assert await cache.get_or_load("page:1", load) == ["fresh"]
        assert loads == ["page:1"]  # the stale page was not served
        assert await other.get("page:2") is MISSING
        assert cache.pending_invalidations == 0
    await client.aclose()
    await other_client.aclose()


async def test_raise_on_error_raises_a_typed_error_and_still_retries(server: RedisServer) -> None:
    client = client_of(server.url)
    async with RedisBackend(client) as backend:
        cache = Cache(backend, ttl=600, observer=None)
        await cache.set("k", 1, tags=["t"])
        pause(server.url)
        with pytest.raises(BackendError):
            await cache.delete("k", raise_on_error=True)
        with pytest.raises(BackendError):
            await cache.invalidate_tags(["t"], raise_on_error=True)
        assert cache.pending_invalidations == 2
        await after_pause()
        assert await cache.delete("other") is True  # goes after the two it remembered
        assert cache.pending_invalidations == 0
        assert await cache.get("k") is MISSING
    await client.aclose()


async def test_while_redis_is_down_reads_load_directly_and_nothing_stale_comes_back(
    fresh_redis_server: RedisServer,
) -> None:
    events: list[Event] = []
    client = client_of(fresh_redis_server.url)
    async with RedisBackend(client) as backend:
        cache = Cache(backend, ttl=600, observer=events.append)
        await cache.set("k", "old")
        fresh_redis_server.stop()
        assert await cache.delete("k") is False

        async def load() -> str:
            return "new"

        assert await cache.get_or_load("k", load) == "new"  # loaded directly
        with pytest.raises(BackendError):
            await cache.get("k")  # a plain read raises, as it always did when Redis fails
        assert cache.pending_invalidations == 1
    await client.aclose()


async def test_pending_invalidations_are_bounded_and_the_oldest_forgotten_is_reported(
    fresh_redis_server: RedisServer,
) -> None:
    events: list[Event] = []
    client = client_of(fresh_redis_server.url)
    async with RedisBackend(client) as backend:
        cache = Cache(backend, observer=events.append, max_pending_invalidations=2)
        fresh_redis_server.stop()
        for key in ("a", "b", "c"):
            assert await cache.delete(key) is False
        assert await cache.delete("b") is False  # already remembered: moves to the end
        assert cache.pending_invalidations == 2
        assert [e.outcome for e in failures(events) if e.outcome != "retried later"] == [
            "forgotten: too many pending invalidations"
        ]
    await client.aclose()


async def test_on_memory_invalidation_cannot_fail_and_reports_success() -> None:
    events: list[Event] = []
    cache = Cache(MemoryBackend(), observer=events.append)
    await cache.set("k", 1, tags=["t"])
    await cache.set("j", 2, tags=["t"])
    assert await cache.delete("k") is True
    assert await cache.invalidate_tags(["t"], raise_on_error=True) is True
    assert await cache.get("k") is MISSING
    assert await cache.get("j") is MISSING
    assert cache.pending_invalidations == 0
    assert events == [] or not failures(events)


def test_max_pending_invalidations_is_validated() -> None:
    bad: Any
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="max_pending_invalidations"):
            Cache(max_pending_invalidations=bad)
