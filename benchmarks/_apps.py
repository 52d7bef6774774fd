"""The apps the HTTP benchmark serves under uvicorn; ``BENCH_APP`` picks one.

* ``bare``: a Starlette app with one route;
* ``memory``: the same behind ``RateLimitMiddleware`` on the memory backend;
* ``redis``: the same on the Redis backend at ``REDIS_URL``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from resilient import (
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
)
from resilient._asgi import ASGIApp

# High enough that the benchmark measures the cost of checking, not of denying.
POLICY = TokenBucket("1000000000/minute")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app(lifespan: object = None) -> Starlette:
    return Starlette(routes=[Route("/", hello)], lifespan=lifespan)  # type: ignore[arg-type]


def build(kind: str) -> ASGIApp:
    if kind == "bare":
        return starlette_app()
    if kind in ("memory", "memory-noheaders"):
        limiter = RateLimiter(MemoryBackend())
        headers = "none" if kind == "memory-noheaders" else "ietf"
        return RateLimitMiddleware(
            starlette_app(),
            limiter=limiter,
            rules=[Rule(POLICY)],
            headers=headers,  # type: ignore[arg-type]
        )
    if kind == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
        backend = RedisBackend(client)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await backend.aclose()
            await client.aclose()

        limiter = RateLimiter(backend)
        return RateLimitMiddleware(starlette_app(lifespan), limiter=limiter, rules=[Rule(POLICY)])
    msg = f"unknown BENCH_APP {kind!r}"
    raise ValueError(msg)


app = build(os.environ.get("BENCH_APP", "bare"))
