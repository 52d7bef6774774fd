"""The apps the HTTP benchmark serves under uvicorn; ``BENCH_APP`` picks one.

* ``bare``: a Starlette app with one route;
* ``floor``: the same behind a pass-through middleware that adds the two header fields
  ``memory`` sends (``RateLimit-Policy`` and ``RateLimit``), fixed: what sending them
  costs, apart from deciding them;
* ``memory``: the same behind ``RateLimitMiddleware`` on the memory backend;
* ``memory-noheaders``: the same without header fields;
* ``redis``: the same on the Redis backend at ``REDIS_URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

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
from resilient._asgi import ASGIApp, Message, Receive, Scope, Send

# High enough that the benchmark measures the cost of checking, not of denying.
POLICY = TokenBucket("1000000000/minute")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app(lifespan: object = None) -> Starlette:
    return Starlette(routes=[Route("/", hello)], lifespan=lifespan)  # type: ignore[arg-type]


class PassThrough:
    """The floor: a pure ASGI middleware that forwards everything and adds fixed headers.

    What any middleware layer that sends header fields costs at the least (a coroutine, a
    wrapped ``send``, a new header list, and the server's handling of the fields), so a
    table can show how much of a rate limiter's cost is its own work.
    """

    def __init__(self, app: ASGIApp, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.headers = list(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.headers

        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            return send(message)

        await self.app(scope, receive, send_with_headers)


def memory_app(headers: str = "ietf") -> RateLimitMiddleware:
    """The Starlette app behind ``RateLimitMiddleware`` on the memory backend."""
    return RateLimitMiddleware(
        starlette_app(),
        limiter=RateLimiter(MemoryBackend()),
        rules=[Rule(POLICY)],
        headers=headers,  # type: ignore[arg-type]
    )


def http_scope(client: tuple[str, int]) -> dict[str, Any]:
    """The scope of ``GET /`` from *client*, as a server would pass it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "client": client,
        "server": ("127.0.0.1", 8000),
    }


def fields_sent(app: ASGIApp) -> list[tuple[bytes, bytes]]:
    """The header fields *app* adds to the bare app's response to one request."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope(client=("127.0.0.1", 40000))

    async def request() -> None:
        await app(scope, receive, send)

    asyncio.run(request())
    bare = {name for name, _ in PlainTextResponse("ok").raw_headers}
    return [(name, value) for name, value in sent[0]["headers"] if name not in bare]


def build(kind: str) -> ASGIApp:
    if kind == "bare":
        return starlette_app()
    if kind == "floor":
        return PassThrough(starlette_app(), fields_sent(memory_app()))
    if kind in ("memory", "memory-noheaders"):
        return memory_app("none" if kind == "memory-noheaders" else "ietf")
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
