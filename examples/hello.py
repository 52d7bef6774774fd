"""A small guarded API: the quickstart's server, until the e-commerce example lands.

Run it with ``python dev.py example`` (or ``python -m examples.hello``), then::

    curl -i http://127.0.0.1:8000/api/hello          # 10 requests a minute per client IP
    curl -i -X POST http://127.0.0.1:8000/api/login  # 3 a minute, then blocked 5 minutes
    curl -i -X POST -H 'Idempotency-Key: k1' -d '{"sku": "A1"}' \
        http://127.0.0.1:8000/api/orders             # twice: one order, then its replay

State lives in memory; set ``REDIS_URL=redis://localhost:6379/0`` to keep it in Redis (a
``redis+cluster://`` URL, or ``REDIS_CLUSTER=1``, for Redis Cluster), so that several
server processes share their limits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from resilient import (
    IdempotencyMiddleware,
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    SlidingWindow,
    TokenBucket,
    by_ip,
)
from resilient._asgi import ASGIApp


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def login(request: Request) -> JSONResponse:
    return JSONResponse({"token": "not-a-real-token"})


class Orders:
    """Creates orders; the idempotency middleware makes sure retries create none twice."""

    def __init__(self) -> None:
        self.created = 0

    async def create(self, request: Request) -> JSONResponse:
        body = await request.body()
        self.created += 1
        return JSONResponse(
            {"order": self.created, "request": body.decode("utf-8", "replace")}, status_code=201
        )


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def backend_from_env() -> MemoryBackend | RedisBackend:
    url = os.environ.get("REDIS_URL")
    if not url:
        return MemoryBackend()
    if url.startswith("redis+cluster://") or os.environ.get("REDIS_CLUSTER") == "1":
        from redis.asyncio.cluster import RedisCluster

        return RedisBackend(RedisCluster.from_url(url.replace("redis+cluster://", "redis://")))
    import redis.asyncio

    return RedisBackend(redis.asyncio.Redis.from_url(url))


def create_app(limiter: RateLimiter | None = None) -> ASGIApp:
    backend = None
    if limiter is None:
        backend = backend_from_env()
        limiter = RateLimiter(backend, deny_cache=10_000)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if isinstance(backend, RedisBackend):
            await backend.aclose()
            await backend.client.aclose()

    orders = Orders()
    app = Starlette(
        routes=[
            Route("/api/hello", hello),
            Route("/api/login", login, methods=["POST"]),
            Route("/api/orders", orders.create, methods=["POST"]),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )
    client = by_ip(trusted_proxies=["127.0.0.1/32"])
    guarded = IdempotencyMiddleware(app, backend, required=["/api/orders"])
    return RateLimitMiddleware(
        guarded,
        limiter=limiter,
        rules=[
            Rule(
                SlidingWindow("3/minute", block_for=300),
                path="/api/login",
                methods=["POST"],
                key=client,
            ),
            Rule(
                SlidingWindow("10/minute"),
                TokenBucket("2/second", burst=5),
                path="/api/*",
                key=client,
            ),
        ],
        exempt=["/healthz"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
