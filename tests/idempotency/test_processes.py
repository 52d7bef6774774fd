"""Several processes sharing one Redis: exactly one claim wins."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
import uvicorn
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
            Starlette(routes=[Route("/api/orders", create_order, methods=["POST"])]),
            backend=backend,
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


# -- Redis restarted empty under several processes ---------------------------------------


def _serve(url: str, ports: Any, stop: Any) -> None:
    """One instance of a service, served by uvicorn with its ASGI lifespan, until *stop*."""

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(url, socket_timeout=1)
        backend = RedisBackend(client)

        async def create_order(request: Request) -> JSONResponse:
            await request.body()
            n = await client.incr("test:orders-created")  # counted after the restart too
            return JSONResponse({"order": n}, status_code=201)

        async def readiness(request: Request) -> JSONResponse:
            return JSONResponse({"quarantine_left": app.quarantine_left, "at": time.time()})

        routes = [
            Route("/api/orders", create_order, methods=["POST"]),
            Route("/readyz", readiness),
        ]
        app = IdempotencyMiddleware(Starlette(routes=routes), backend=backend, quarantine=30.0)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="critical")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            assert not serving.done(), "uvicorn stopped while starting"
            await asyncio.sleep(0.01)
        ports.put(server.servers[0].sockets[0].getsockname()[1])
        await asyncio.to_thread(stop.wait)
        server.should_exit = True
        await serving
        await backend.aclose()
        await client.aclose()

    asyncio.run(main())


@pytest.mark.slow
def test_processes_refuse_orders_until_one_moment_after_a_restart_empty(
    fresh_redis_server: RedisServer,
) -> None:
    # "a" served an order before the loss, "b" had served none (it learnt the marker at
    # its startup), "c" started after the loss. The first order after the loss reaches
    # "b": every process refuses, and their quarantines end at the same moment.
    context = multiprocessing.get_context("spawn")
    stop, ports = context.Event(), context.Queue()

    def start() -> tuple[Any, str]:
        process = context.Process(target=_serve, args=(fresh_redis_server.url, ports, stop))
        process.start()
        return process, f"http://127.0.0.1:{ports.get(timeout=60)}"

    processes: list[Any] = []
    try:
        (a, url_a), (b, url_b) = start(), start()
        processes += [a, b]
        with httpx.Client(timeout=10) as http:
            paid = http.post(f"{url_a}/api/orders", json={}, headers={"Idempotency-Key": "k1"})
            with redis.Redis.from_url(fresh_redis_server.url) as admin:
                os.kill(int(admin.info("server")["process_id"]), signal.SIGKILL)
            fresh_redis_server.stop()  # reaps the killed process
            fresh_redis_server.start()  # empty: no persistence
            first = http.post(f"{url_b}/api/orders", json={}, headers={"Idempotency-Key": "k2"})
            again = http.post(f"{url_a}/api/orders", json={}, headers={"Idempotency-Key": "k1"})
            c, url_c = start()
            processes.append(c)
            late = http.post(f"{url_c}/api/orders", json={}, headers={"Idempotency-Key": "k3"})
            ready = [http.get(f"{url}/readyz").json() for url in (url_a, url_b, url_c)]
        with redis.Redis.from_url(fresh_redis_server.url) as admin:
            ran_after = int(admin.get("test:orders-created") or 0)
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)
    assert paid.status_code == 201
    assert [r.status_code for r in (first, again, late)] == [503, 503, 503]
    assert ran_after == 0  # nothing ran after the loss
    ends = [r["at"] + r["quarantine_left"] for r in ready]
    assert min(r["quarantine_left"] for r in ready) > 25
    # One moment, from Redis TIME, for every process: "c" got its first order a second or
    # so later (a spawned process's start), so a quarantine of its own would end later.
    assert max(ends) - min(ends) < 0.25
    assert [process.exitcode for process in processes] == [0, 0, 0]
