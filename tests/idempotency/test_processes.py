"""Several processes sharing one Redis: exactly one claim wins."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import httpx
import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from resilient import IdempotencyMiddleware, RedisBackend
from resilient.testing import RedisCluster, RedisServer

PROCESSES = 4
REQUESTS = 50


def _worker(url: str, cluster: bool, start: Any, out: Any) -> None:
    async def main() -> list[tuple[int, bytes, bool]]:
        client: Any = (
            AsyncRedisCluster.from_url(url) if cluster else redis.asyncio.Redis.from_url(url)
        )

        async def create_order(request: Request) -> JSONResponse:
            await request.body()
            # Counted in Redis, so every process's runs add up in one place.
            n = await client.incr("test:orders-created")
            await asyncio.sleep(0.05)  # long enough for the duplicates to arrive meanwhile
            return JSONResponse({"order": n}, status_code=201)

        backend = RedisBackend(client)
        app = IdempotencyMiddleware(
            Starlette(routes=[Route("/api/orders", create_order, methods=["POST"])]), backend
        )
        await client.ping()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            start.wait()
            responses = await asyncio.gather(
                *(
                    http.post("/api/orders", json={"sku": 1}, headers={"Idempotency-Key": "k"})
                    for _ in range(REQUESTS)
                )
            )
        await backend.aclose()
        await client.aclose()
        return [
            (r.status_code, r.content, r.headers.get("idempotent-replayed") == "true")
            for r in responses
        ]

    out.put(asyncio.run(main()))


def _run(url: str, *, cluster: bool) -> list[tuple[int, bytes, bool]]:
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    workers = [
        context.Process(target=_worker, args=(url, cluster, start, out)) for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    start.set()
    results = [row for _ in workers for row in out.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    return results


def _check(results: list[tuple[int, bytes, bool]], created: int) -> None:
    assert created == 1
    assert len(results) == PROCESSES * REQUESTS
    firsts = [body for status, body, replayed in results if status == 201 and not replayed]
    assert firsts == [b'{"order":1}']
    for status, body, _ in results:
        assert status in (201, 409)
        if status == 201:
            assert body == b'{"order":1}'


@pytest.mark.slow
def test_processes_on_one_redis_create_one_order(redis_server: RedisServer) -> None:
    if not redis_server.is_running:
        redis_server.start()
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    results = _run(redis_server.url, cluster=False)
    _check(results, int(client.get("test:orders-created") or 0))
    client.close()


@pytest.mark.slow
@pytest.mark.cluster
def test_processes_on_a_cluster_create_one_order(redis_cluster: RedisCluster) -> None:
    from redis.cluster import RedisCluster as SyncRedisCluster

    client = SyncRedisCluster.from_url(redis_cluster.url)
    client.flushall(target_nodes=SyncRedisCluster.PRIMARIES)
    results = _run(redis_cluster.url, cluster=True)
    _check(results, int(client.get("test:orders-created") or 0))
    client.close()
