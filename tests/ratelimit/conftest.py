from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import RedisBackend


@pytest.fixture
async def redis_backend(redis_client: redis.asyncio.Redis) -> AsyncIterator[RedisBackend]:
    async with RedisBackend(redis_client) as backend:
        yield backend


@pytest.fixture
async def cluster_backend(cluster_client: AsyncRedisCluster) -> AsyncIterator[RedisBackend]:
    async with RedisBackend(cluster_client) as backend:
        yield backend
