"""Every denial emits exactly one ``RateLimited`` event, whichever path answers it.

The paths: the memory store's fast path (which falls back to the full check on a denial),
the memory store's full check, Redis, the limiter's in-process deny cache, ``@rate_limit``
and ``RateLimitMiddleware`` (its hot path of one rule of one policy on memory, and its
general path). Each is counted twice: the events an observer receives, and the Prometheus
counter those events feed, which is what an operator reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from resilient import (
    MemoryBackend,
    RateLimiter,
    RateLimitExceeded,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    SlidingWindow,
    TokenBucket,
    rate_limit,
)
from resilient.events import Event, RateLimited, observe_all
from resilient.ratelimit.core import Policy
from resilient.testing import FakeClock
from tests.observers.conftest import Prometheus

Adapter = Literal["limiter", "decorator", "middleware"]
ATTEMPTS, LIMIT = 9, 2  # seven denials

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture
def prometheus() -> Prometheus:
    return Prometheus()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> MemoryBackend | RedisBackend:
    if request.param == "memory":
        return MemoryBackend()
    redis_backend: RedisBackend = request.getfixturevalue("redis_backend")
    return redis_backend


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _attempt(
    limiter: RateLimiter, adapter: Adapter, policies: tuple[Policy, ...]
) -> Callable[[], Awaitable[bool]]:
    """Return a function that makes one attempt through *adapter* and says if it passed."""
    if adapter == "limiter":

        async def hit() -> bool:
            return (await limiter.hit("login:alice", *policies)).allowed

        return hit
    if adapter == "decorator":

        @rate_limit(limiter, *policies, key="login:{user}")
        async def login(user: str) -> None:
            return None

        async def call() -> bool:
            try:
                await login("alice")
            except RateLimitExceeded:
                return False
            return True

        return call
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/api/login", _ok, methods=["POST"])]),
        limiter=limiter,
        rules=[Rule(*policies, path="/api/login", methods=["POST"], name="login")],
    )
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4711))

    async def post() -> bool:
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            response = await client.post("/api/login")
        assert response.status_code in (200, 429)
        return response.status_code == 200

    return post


@pytest.mark.parametrize("adapter", ["limiter", "decorator", "middleware"])
@pytest.mark.parametrize("deny_cache", [0, 64], ids=["no-deny-cache", "deny-cache"])
@pytest.mark.parametrize("several", [False, True], ids=["one-policy", "two-policies"])
async def test_every_denial_emits_one_event_and_counts_once(
    backend: MemoryBackend | RedisBackend,
    adapter: Adapter,
    deny_cache: int,
    several: bool,
    prometheus: Prometheus,
) -> None:
    events: list[Event] = []
    clock = FakeClock()
    limiter = RateLimiter(
        backend,
        clock=clock,
        deny_cache=deny_cache,
        observer=observe_all(events.append, prometheus.observer),
    )
    login = TokenBucket(f"{LIMIT}/minute", name="login")
    policies: tuple[Policy, ...] = (login, SlidingWindow("100/hour")) if several else (login,)
    attempt = _attempt(limiter, adapter, policies)
    passed = []
    for _ in range(ATTEMPTS):
        passed.append(await attempt())
        clock.advance(1)
    assert passed == [True] * LIMIT + [False] * (ATTEMPTS - LIMIT)
    denials = [e for e in events if isinstance(e, RateLimited)]
    assert len(denials) == ATTEMPTS - LIMIT
    assert {(e.policy, e.block) for e in denials} == {("login", "ratelimit")}
    # A token comes back every 30 s; the first denial comes 2 s after the first hit.
    assert [e.retry_after for e in denials] == [28.0 - i for i in range(ATTEMPTS - LIMIT)]
    counted = prometheus.value("resilient_ratelimit_denied_total", policy="login")
    assert counted == ATTEMPTS - LIMIT


async def test_the_middlewares_hot_path_counts_every_denial(prometheus: Prometheus) -> None:
    # One rule of one policy on memory without a deny cache: the hot path, which hands a
    # denial to the full check. Several clients, so denials interleave with admissions.
    events: list[Event] = []
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, observer=observe_all(events.append, prometheus.observer))
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/api/items", _ok)]),
        limiter=limiter,
        rules=[Rule(TokenBucket("3/minute", name="api"))],
    )
    statuses: list[int] = []
    for ip in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]:
        transport = httpx.ASGITransport(app=app, client=(ip, 4711))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            statuses += [(await client.get("/api/items")).status_code for _ in range(5)]
    assert statuses.count(429) == 6
    assert sum(isinstance(e, RateLimited) for e in events) == 6
    assert prometheus.value("resilient_ratelimit_denied_total", policy="api") == 6
