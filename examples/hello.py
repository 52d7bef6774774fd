"""The smallest composition: a rate limit, an idempotent endpoint and a guarded outbound call.

Run it with ``python -m examples.hello``, then::

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

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from resilient import (
    CircuitBreaker,
    CircuitOpenError,
    IdempotencyMiddleware,
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    SlidingWindow,
    TokenBucket,
    by_ip,
    retry,
)
from resilient.httpx import ResilientTransport


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


class Upstream:
    """A dependency to call out to (in process, here): a forecast service that can fail."""

    def __init__(self) -> None:
        self.failing = False
        self.calls = 0
        self.app = Starlette(routes=[Route("/forecast", self.forecast)])

    async def forecast(self, request: Request) -> JSONResponse:
        self.calls += 1
        if self.failing:
            return JSONResponse({"error": "overloaded"}, status_code=503)
        return JSONResponse({"forecast": "sunny"})


class Forecasts:
    """Calls the upstream service composed as documented, outermost first:
    fallback -> retry -> circuit breaker -> attempt timeout -> call."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.breaker = CircuitBreaker(
            "forecast", failure_rate=0.5, minimum_calls=4, window=10, open_for=30.0
        )
        transport = ResilientTransport(
            httpx.ASGITransport(app=upstream.app),
            breaker=self.breaker,
            retry=retry(attempts=3, deadline=2.0, base=0.05, cap=0.2),
            timeout=1.0,
        )
        self.client = httpx.AsyncClient(transport=transport, base_url="http://forecast")

    async def get(self, request: Request) -> JSONResponse:
        try:
            response = await self.client.get("/forecast")
            response.raise_for_status()
        except (CircuitOpenError, httpx.HTTPError) as exc:  # the fallback
            reason = "circuit open" if isinstance(exc, CircuitOpenError) else "upstream failed"
            return JSONResponse({"forecast": "unknown", "fallback": reason})
        return JSONResponse(response.json())

    async def outage(self, request: Request) -> JSONResponse:
        self.upstream.failing = request.query_params.get("outage") == "1"
        return JSONResponse({"outage": self.upstream.failing, "breaker": self.breaker.state.value})


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
        await forecasts.client.aclose()
        if isinstance(backend, RedisBackend):
            await backend.aclose()
            await backend.client.aclose()

    orders = Orders()
    forecasts = Forecasts(Upstream())
    app = Starlette(
        routes=[
            Route("/api/hello", hello),
            Route("/api/login", login, methods=["POST"]),
            Route("/api/orders", orders.create, methods=["POST"]),
            Route("/api/forecast", forecasts.get),
            Route("/api/upstream", forecasts.outage, methods=["POST"]),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )
    client = by_ip(trusted_proxies=["127.0.0.1/32"])
    guarded = IdempotencyMiddleware(app, backend=backend, required=["/api/orders"])
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
