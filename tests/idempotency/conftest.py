from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from resilient import RedisBackend
from resilient._asgi import ASGIApp


class Shop:
    """A small real app whose handlers count how often they ran."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.gate.set()
        self.app = Starlette(
            routes=[
                Route("/api/orders", self.create_order, methods=["POST", "GET", "PUT"]),
                Route("/api/slow", self.slow, methods=["POST"]),
                Route("/api/boom", self.boom, methods=["POST"]),
                Route("/api/fail", self.fail, methods=["POST"]),
                Route("/api/big", self.big, methods=["POST"]),
                Route("/api/stream", self.stream, methods=["POST"]),
            ]
        )

    def count(self, name: str) -> int:
        self.runs[name] = self.runs.get(name, 0) + 1
        return self.runs[name]

    async def create_order(self, request: Request) -> Response:
        body = await request.body()
        n = self.count("orders")
        payload = {"order": n, "echo": json.loads(body) if body else None}
        response = JSONResponse(payload, status_code=201, headers={"X-Order": str(n)})
        response.set_cookie("session", f"s{n}")
        return response

    async def slow(self, request: Request) -> Response:
        await request.body()
        n = self.count("slow")
        self.entered.set()
        await self.gate.wait()
        return JSONResponse({"slow": n}, status_code=201)

    async def boom(self, request: Request) -> Response:
        self.count("boom")
        raise RuntimeError("the handler failed")

    async def fail(self, request: Request) -> Response:
        n = self.count("fail")
        return JSONResponse({"fail": n}, status_code=503)

    async def big(self, request: Request) -> Response:
        n = self.count("big")
        return Response(b"x" * 2000 + str(n).encode())

    async def stream(self, request: Request) -> Response:
        n = self.count("stream")
        size = int(request.query_params.get("size", "10"))

        async def chunks() -> AsyncIterator[bytes]:
            yield b"a" * size
            yield str(n).encode()

        return StreamingResponse(chunks(), media_type="text/plain")


def client_for(app: ASGIApp, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(
        app=app, client=("203.0.113.7", 4711), raise_app_exceptions=raise_app_exceptions
    )
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
def shop() -> Shop:
    return Shop()


@pytest.fixture
async def redis_backend(redis_client: redis.asyncio.Redis) -> AsyncIterator[RedisBackend]:
    async with RedisBackend(redis_client) as backend:
        yield backend
