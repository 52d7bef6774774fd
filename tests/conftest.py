"""Fixtures: real Redis servers (standalone and cluster), started once per session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio
from hypothesis import settings
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import RedisBackend
from resilient.testing import RedisCluster, RedisServer

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone server for the whole session (tests flush it)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One 3-master Redis Cluster for the whole session (tests flush it)."""
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop or restart Redis."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of the session's server, flushed before the test."""
    if not redis_server.is_running:  # a test may have stopped it
        redis_server.start()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    """A cluster client, with every master flushed before the test."""
    client = AsyncRedisCluster.from_url(redis_cluster.url)
    await client.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
    yield client
    await client.aclose()


@pytest.fixture
async def two_backends(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Two backends on the session's server, each with a client of its own: two instances
    of one service (the server is flushed first)."""
    if not redis_server.is_running:
        redis_server.start()
    one = redis.asyncio.Redis.from_url(redis_server.url)
    other = redis.asyncio.Redis.from_url(redis_server.url)
    await one.flushall()
    async with RedisBackend(one) as a, RedisBackend(other) as b:
        yield a, b
    await one.aclose()
    await other.aclose()
