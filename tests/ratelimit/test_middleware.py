"""RateLimitMiddleware in front of a real Starlette app, driven through httpx."""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence

import httpx
import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from resilient import (
    BackendError,
    ConfigurationError,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    SlidingWindow,
    TokenBucket,
    by_header,
    by_ip,
)
from resilient._asgi import ASGIApp, Message, Receive, Scope, Send
from resilient.ratelimit.core import Charge, Outcome, Policy
from resilient.ratelimit.middleware import HeaderStyle
from resilient.ratelimit.store import Admit
from resilient.testing import FakeClock, RedisServer
from tests.ratelimit.strategies import policies

calls: list[str] = []


async def handler(request: Request) -> PlainTextResponse:
    calls.append(request.url.path)
    return PlainTextResponse("ok", headers={"x-app": "1"})


async def login(request: Request) -> JSONResponse:
    calls.append("login")
    return JSONResponse({"token": "t"})


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.close()


def make_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/api/login", login, methods=["POST", "GET"]),
            Route("/api/users/{id}", handler),
            Route("/api/items", handler),
            Route("/healthz", handler),
            WebSocketRoute("/ws", ws),
        ]
    )


def client_for(app: ASGIApp, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 4711))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    calls.clear()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_700_000_040.0)  # on a minute boundary: windows start now


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock=clock)


async def test_denies_with_429_retry_after_and_a_problem_body(limiter: RateLimiter) -> None:
    rule = Rule(SlidingWindow("2/minute"), path="/api/login", methods=["POST"])
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app) as client:
        statuses = [(await client.post("/api/login")).status_code for _ in range(3)]
        denied = await client.post("/api/login")
    assert statuses == [200, 200, 429]
    assert calls == ["login", "login"]
    assert denied.headers["content-type"] == "application/problem+json"
    body = denied.json()
    assert body["status"] == 429
    assert body["title"] == "Too Many Requests"
    assert "2/minute" in body["detail"]
    assert int(denied.headers["retry-after"]) == body["retry_after"] >= 1


async def test_allowed_responses_carry_ietf_headers(limiter: RateLimiter) -> None:
    rule = Rule(
        SlidingWindow("10/minute"), TokenBucket("1/second", burst=5, name="burst"), path="/api/*"
    )
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app) as client:
        response = await client.get("/api/items")
    assert response.status_code == 200
    assert response.headers["x-app"] == "1"  # the app's own headers are kept
    assert response.headers["ratelimit-policy"] == '"10/minute";q=10;w=60, "burst";q=5;w=5'
    assert response.headers["ratelimit"] == '"10/minute";r=9;t=120, "burst";r=4;t=1'


async def test_legacy_headers_on_request(limiter: RateLimiter) -> None:
    rule = Rule(TokenBucket("10/minute"), path="/api/*")
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule], headers="legacy")
    async with client_for(app) as client:
        response = await client.get("/api/items")
    assert "ratelimit" not in response.headers
    assert response.headers["x-ratelimit-limit"] == "10"
    assert response.headers["x-ratelimit-remaining"] == "9"
    assert response.headers["x-ratelimit-reset"] == "6"


async def test_no_headers_when_turned_off(limiter: RateLimiter) -> None:
    rule = Rule(TokenBucket("10/minute"))
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule], headers="none")
    async with client_for(app) as client:
        response = await client.get("/api/items")
    assert not any(h.startswith(("ratelimit", "x-ratelimit")) for h in response.headers)


async def test_on_the_system_clock_the_hot_path_and_the_full_check_share_a_counter() -> None:
    limiter, policy = RateLimiter(), SlidingWindow("2/minute", block_for=60)
    rule = Rule(policy, name="login")
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app) as client:
        statuses = [(await client.get("/api/items")).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    peeked = await limiter.peek("login|ip:203.0.113.7", policy)
    assert not peeked.allowed
    assert peeked.retry_after > 50  # the block period that the denial recorded


async def test_quota_headers_are_remembered_within_a_bound(limiter: RateLimiter) -> None:
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[Rule(TokenBucket("30/hour"))])
    async with client_for(app) as client:
        states = [(await client.get("/api/items")).headers["ratelimit"] for _ in range(20)]
        again = RateLimitMiddleware(make_app(), limiter=RateLimiter(), rules=app.rules)
        async with client_for(again) as fresh:
            first = (await fresh.get("/api/items")).headers["ratelimit"]
    assert states == [f'"30/hour";r={29 - i};t={120 * (i + 1)}' for i in range(20)]
    assert first == states[0]


async def test_quota_headers_stay_right_and_hold_bounded_memory_past_any_number(
    limiter: RateLimiter,
) -> None:
    # Every request leaves a quota (remaining, reset) no earlier one had: each adds headers
    # to what the middleware remembers, which must be forgotten again at some bound.
    policy = TokenBucket("100000/hour")  # a token every 36 ms, none back: the clock stands

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = RateLimitMiddleware(app, limiter=limiter, rules=[Rule(policy)])
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("1.2.3.4", 1)}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    held: list[int] = []
    tracemalloc.start()
    try:
        for i in range(6_000):
            sent.clear()
            await limited(dict(scope), receive, send)
            fields = dict(sent[0]["headers"])
            assert fields[b"ratelimit"] == b'"100000/hour";r=%d;t=%d' % (
                99_999 - i,
                math.ceil((i + 1) * 0.036),
            )
            if i % 250 == 249:
                gc.collect()
                held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    # Remembering every quota would hold twice as much in the second half as in the first.
    assert max(held[12:]) < 1.25 * max(held[:12])


async def test_rules_match_methods_templates_and_prefixes(limiter: RateLimiter) -> None:
    rules = [
        Rule(SlidingWindow("1/minute"), path="/api/login", methods=["POST"]),
        Rule(SlidingWindow("1/minute"), path="/api/users/{id}"),
    ]
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=rules)
    async with client_for(app) as client:
        assert (await client.post("/api/login")).status_code == 200
        assert (await client.post("/api/login")).status_code == 429
        assert (await client.get("/api/login")).status_code == 200  # GET is not limited
        assert (await client.get("/api/users/1")).status_code == 200
        assert (await client.get("/api/users/2")).status_code == 429  # one rule, one counter
        assert (await client.get("/api/users/1/x")).status_code == 404  # template: no match
        assert (await client.get("/api/items")).status_code == 200


async def test_exempt_paths_are_never_limited(limiter: RateLimiter) -> None:
    app = RateLimitMiddleware(
        make_app(), limiter=limiter, rules=[Rule(SlidingWindow("1/minute"))], exempt=["/healthz"]
    )
    async with client_for(app) as client:
        statuses = [(await client.get("/healthz")).status_code for _ in range(5)]
    assert statuses == [200] * 5


async def test_each_client_ip_has_its_own_counter(limiter: RateLimiter) -> None:
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[Rule(TokenBucket("1/minute"))])
    async with client_for(app, "198.51.100.1") as one, client_for(app, "198.51.100.2") as two:
        assert (await one.get("/api/items")).status_code == 200
        assert (await one.get("/api/items")).status_code == 429
        assert (await two.get("/api/items")).status_code == 200


async def test_spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_the_key(
    limiter: RateLimiter,
) -> None:
    rule = Rule(TokenBucket("1/minute"), key=by_ip(trusted_proxies=["10.0.0.0/8"]))
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app, "203.0.113.9") as client:
        assert (await client.get("/api/items", headers={"x-forwarded-for": "1.1.1.1"})).is_success
        spoofed = await client.get("/api/items", headers={"x-forwarded-for": "2.2.2.2"})
    assert spoofed.status_code == 429


async def test_forwarded_for_from_a_trusted_proxy_sets_the_key(limiter: RateLimiter) -> None:
    rule = Rule(TokenBucket("1/minute"), key=by_ip(trusted_proxies=["10.0.0.0/8"]))
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app, "10.1.2.3") as proxy:
        assert (await proxy.get("/api/items", headers={"x-forwarded-for": "1.1.1.1"})).is_success
        assert (await proxy.get("/api/items", headers={"x-forwarded-for": "2.2.2.2"})).is_success
        again = await proxy.get("/api/items", headers={"x-forwarded-for": "1.1.1.1"})
    assert again.status_code == 429


async def test_requests_without_a_key_are_not_limited_by_that_rule(limiter: RateLimiter) -> None:
    rule = Rule(TokenBucket("1/minute"), key=by_header("X-API-Key"))
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app) as client:
        assert [(await client.get("/api/items")).status_code for _ in range(3)] == [200] * 3
        keyed = [
            (await client.get("/api/items", headers={"x-api-key": "k1"})).status_code
            for _ in range(2)
        ]
    assert keyed == [200, 429]


async def test_cost_per_rule(limiter: RateLimiter) -> None:
    rule = Rule(TokenBucket("10/minute"), cost=4)
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app) as client:
        statuses = [(await client.get("/api/items")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_block_period_outlasts_the_window(clock: FakeClock, limiter: RateLimiter) -> None:
    rule = Rule(SlidingWindow("2/minute", block_for=900), path="/api/login")
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app) as client:
        for _ in range(2):
            await client.post("/api/login")
        blocked = await client.post("/api/login")
        assert int(blocked.headers["retry-after"]) == 900
        clock.advance(600)
        assert (await client.post("/api/login")).status_code == 429
        clock.advance(301)
        assert (await client.post("/api/login")).status_code == 200


@pytest.mark.parametrize("phase", [0, 10, 500])
@pytest.mark.parametrize("deny_cache", [0, 100])
async def test_a_login_block_answers_retry_after_900_wherever_the_window_stands(
    phase: int, deny_cache: int
) -> None:
    # The README's brute-force story: five guesses, then 429 with Retry-After 900, on a
    # clock that starts anywhere in a 15-minute window (early, it used to say up to 1,080).
    clock = FakeClock(start=1_800_000_000 - 1_800_000_000 % 900 + phase)
    limiter = RateLimiter(clock=clock, deny_cache=deny_cache)
    rule = Rule(SlidingWindow("5/15minutes", block_for=900), path="/api/login")
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule])
    async with client_for(app) as client:
        guesses = [(await client.post("/api/login")).status_code for _ in range(5)]
        blocked = await client.post("/api/login")
        clock.advance(300)
        still = await client.post("/api/login")
        clock.advance(600)
        after = await client.post("/api/login")
    assert guesses == [200] * 5
    assert (blocked.status_code, blocked.headers["retry-after"]) == (429, "900")
    assert blocked.headers["ratelimit"] == '"5/15minutes";r=0;t=900'
    assert (still.status_code, still.headers["retry-after"]) == (429, "600")
    assert after.status_code == 200
    assert after.headers["ratelimit"].startswith('"5/15minutes";r=4;')  # a fresh quota


async def test_retry_after_passes_with_the_clock(clock: FakeClock, limiter: RateLimiter) -> None:
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[Rule(TokenBucket("1/minute"))])
    async with client_for(app) as client:
        await client.get("/api/items")
        denied = await client.get("/api/items")
        clock.advance(int(denied.headers["retry-after"]))
        assert (await client.get("/api/items")).status_code == 200


@settings(max_examples=50)
@given(
    policy=policies(),
    headers=st.sampled_from(["ietf", "legacy", "both", "none"]),
    rules=st.integers(1, 2),
    steps=st.lists(st.tuples(st.integers(0, 3000), st.booleans()), min_size=1, max_size=30),
)
async def test_responses_follow_the_limiters_decisions(
    policy: Policy, headers: HeaderStyle, rules: int, steps: list[tuple[int, bool]]
) -> None:
    # One rule takes the middleware's hot path; a second (never matching) rule, the
    # general one. Either way every response must say what a twin limiter decides.
    clock = FakeClock(start=1_700_000_040.0)
    limiter, twin = RateLimiter(clock=clock), RateLimiter(clock=clock)
    rule = Rule(policy, name="r")
    others = [Rule(TokenBucket("1/hour"), path="/other")] * (rules - 1)
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[rule, *others], headers=headers)
    ips = ["198.51.100.7", "198.51.100.8"]
    async with client_for(app, ips[0]) as one, client_for(app, ips[1]) as two:
        for advance_ms, second in steps:
            clock.advance(advance_ms / 1000)
            response = await (two if second else one).get("/api/items")
            expected = await twin.hit(f"r|ip:{ips[second]}", policy)
            assert response.status_code == (200 if expected.allowed else 429)
            state = response.headers.get("ratelimit")
            limit = response.headers.get("x-ratelimit-limit")
            reset = math.ceil(expected.reset_after)
            if headers in ("ietf", "both"):
                assert state == f'"{policy.name}";r={expected.remaining};t={reset}'
            else:
                assert state is None
            if headers in ("legacy", "both"):
                assert limit == str(policy.capacity)
                assert response.headers["x-ratelimit-remaining"] == str(expected.remaining)
                assert response.headers["x-ratelimit-reset"] == str(reset)
            else:
                assert limit is None
            if not expected.allowed:
                assert response.headers["retry-after"] == str(
                    max(1, math.ceil(expected.retry_after))
                )


async def test_deny_cache_answers_without_the_backend(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, deny_cache=100)
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[Rule(TokenBucket("1/minute"))])
    async with client_for(app) as client:
        await client.get("/api/items")
        first = await client.get("/api/items")
        clock.advance(30)
        second = await client.get("/api/items")
        clock.advance(31)
        third = await client.get("/api/items")
    assert first.status_code == second.status_code == 429
    assert first.headers["retry-after"] == "60"
    assert second.headers["retry-after"] == "30"
    assert third.status_code == 200


async def test_websockets_and_lifespan_pass_through(limiter: RateLimiter) -> None:
    seen: list[str] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope["type"])

    middleware = RateLimitMiddleware(app, limiter=limiter, rules=[Rule(TokenBucket("1/hour"))])
    for kind in ("websocket", "lifespan", "websocket"):
        await middleware({"type": kind, "path": "/ws"}, None, None)  # type: ignore[arg-type]
    assert seen == ["websocket", "lifespan", "websocket"]


@pytest.fixture
async def dead_redis(fresh_redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url)
    fresh_redis_server.stop()
    async with RedisBackend(client) as backend:
        yield backend
    await client.aclose()


@pytest.mark.redis
async def test_redis_down_fail_closed_answers_503_never_500(
    dead_redis: RedisBackend,
) -> None:
    limiter = RateLimiter(dead_redis, on_backend_error="closed")
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[Rule(TokenBucket("5/minute"))])
    async with client_for(app) as client:
        response = await client.get("/api/items")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert json.loads(response.content)["status"] == 503
    assert calls == []


@pytest.mark.redis
async def test_redis_down_fail_open_serves_without_quota_headers(
    dead_redis: RedisBackend,
) -> None:
    limiter = RateLimiter(dead_redis, on_backend_error="open", observer=None)
    app = RateLimitMiddleware(make_app(), limiter=limiter, rules=[Rule(TokenBucket("1/minute"))])
    async with client_for(app) as client:
        statuses = [(await client.get("/api/items")).status_code for _ in range(3)]
        response = await client.get("/api/items")
    assert statuses == [200, 200, 200]
    assert "ratelimit" not in response.headers


@pytest.mark.redis
async def test_middleware_on_redis_shares_counters_between_apps(
    redis_client: redis.asyncio.Redis,
) -> None:
    def instance(backend: RedisBackend) -> ASGIApp:
        limiter = RateLimiter(backend)
        return RateLimitMiddleware(make_app(), limiter=limiter, rules=[Rule(TokenBucket("2/hour"))])

    async with (
        RedisBackend(redis_client) as first,
        RedisBackend(redis_client) as second,
        client_for(instance(first)) as one,
        client_for(instance(second)) as two,
    ):
        statuses = [
            (await one.get("/api/items")).status_code,
            (await two.get("/api/items")).status_code,
            (await one.get("/api/items")).status_code,
        ]
    assert statuses == [200, 200, 429]


def test_configuration_errors_are_clear() -> None:
    limiter = RateLimiter()
    with pytest.raises(ConfigurationError, match="at least one policy"):
        Rule()
    with pytest.raises(ConfigurationError, match="start with '/'"):
        Rule(TokenBucket("1/second"), path="api")
    with pytest.raises(ConfigurationError, match="exceeds the capacity"):
        Rule(TokenBucket("1/second"), cost=2)
    with pytest.raises(ConfigurationError, match="headers"):
        RateLimitMiddleware(make_app(), limiter=limiter, rules=[], headers="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Rule objects"):
        RateLimitMiddleware(make_app(), limiter=limiter, rules=[TokenBucket("1/s")])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="malformed route template"):
        Rule(TokenBucket("1/second"), path="/a/{b")


def test_rules_refuse_methods_names_and_lists_of_the_wrong_type() -> None:
    policy = TokenBucket("1/second")
    with pytest.raises(ConfigurationError, match="HTTP method names"):
        Rule(policy, methods=["GET", 1])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="HTTP method names"):
        Rule(policy, methods=[""])
    with pytest.raises(ConfigurationError, match="name must be a string"):
        Rule(policy, name=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="list of Rule objects"):
        RateLimitMiddleware(make_app(), limiter=RateLimiter(), rules=Rule(policy))  # type: ignore[arg-type]


class FailingStore:
    """A store with the fast-path protocol whose state has become unreachable."""

    async def check(
        self, key: str, policies: Sequence[Policy], cost: int, now_ms: int | None, consume: bool
    ) -> Sequence[Outcome]:
        raise BackendError("gone")

    async def clear(self, key: str, policies: Sequence[Policy]) -> None:
        raise BackendError("gone")

    def check_now(
        self, key: str, policies: Sequence[Policy], cost: int, now_ms: int | None, consume: bool
    ) -> Sequence[Outcome]:
        raise BackendError("gone")

    def admitter(
        self,
        policy: Policy,
        *,
        cost: int = 1,
        prefix: str = "",
        now_ms: Callable[[], int] | None = None,
    ) -> Admit:
        def admit(key: str) -> Charge | None:
            raise BackendError("gone")

        return admit


@pytest.mark.parametrize("rules", [1, 2], ids=["hot path", "every rule"])
async def test_a_failing_fast_path_is_answered_by_the_limiters_policy_never_a_500(
    rules: int,
) -> None:
    limits = [Rule(TokenBucket("5/second")), Rule(SlidingWindow("9/minute"))][:rules]
    store = FailingStore()
    opened = RateLimiter(store, on_backend_error="open", observer=None)
    closed = RateLimiter(store, on_backend_error="closed", backend_retry_after=2, observer=None)
    async with client_for(RateLimitMiddleware(make_app(), limiter=opened, rules=limits)) as client:
        admitted = await client.get("/api/items")
    async with client_for(RateLimitMiddleware(make_app(), limiter=closed, rules=limits)) as client:
        refused = await client.get("/api/items")
    assert admitted.status_code == 200
    assert "ratelimit" not in admitted.headers  # degraded: no quota to tell
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
