"""Fuzzing the whole stack at the ASGI level: every middleware answers every request.

Random compositions of ``JWTAuthMiddleware``, ``RateLimitMiddleware`` and
``IdempotencyMiddleware``, in random orders, around a small real Starlette app, get random
HTTP scopes: paths with lone surrogates and control characters, odd methods, raw query
strings, huge, duplicated and non-ASCII header values, bad ``Idempotency-Key``,
``Authorization``, ``X-Forwarded-For`` and ``Forwarded`` fields, bodies split in chunks,
clients that disconnect. Whatever arrives, the stack must send exactly one response (at
most one when the client went away first), never a 5xx (the backends are in memory, so
the documented 503s of a backend outage cannot happen), a problem body with every 4xx,
and let no exception escape.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from resilient import (
    IdempotencyMiddleware,
    JWKSClient,
    JWTAuthMiddleware,
    JWTValidator,
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    by_header,
    by_ip,
    by_user,
)
from resilient._asgi import ASGIApp, Message
from resilient.idempotency import default_scope_key, fingerprint_request
from resilient.problem import problem_body
from resilient.testing import FakeClock, LocalIssuer, RedisServer

FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
MIDDLEWARES = ("auth", "ratelimit", "idempotency")

# Characters no well-behaved server puts in a path or a method, but a scope may hold.
HOSTILE_CHARS = ["\ud800", "\udfff", "\udc80", "\x00", "\n", "\r", "\x7f", "\u2028", "%", "/"]
hostile_text = st.text(alphabet=st.characters() | st.sampled_from(HOSTILE_CHARS), max_size=24)
COMMON_PATHS = ["/", "/items", "/items/x", "/api/orders", "/api/orders/1", "/healthz", "/nope"]
paths = st.one_of(
    st.sampled_from(COMMON_PATHS),
    st.sampled_from(COMMON_PATHS),  # three times: most requests reach a route
    st.sampled_from(COMMON_PATHS),
    st.builds(lambda p, s: p + s, st.sampled_from(["/", "/api/orders", "/items/"]), hostile_text),
    hostile_text,
)
GOOD_METHODS = ["GET", "POST", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"]
methods = st.one_of(
    st.sampled_from(GOOD_METHODS),
    st.sampled_from(GOOD_METHODS),
    st.sampled_from(["post", "Post", "", "CONNECT", "BREW", "P\u00d6ST", "POST\x00"]),
    hostile_text,
)
raw_bytes = st.binary(max_size=40)
huge = st.integers(min_value=1_000, max_value=20_000).map(lambda n: b"a" * n)
keys = st.one_of(
    st.sampled_from([b"k1", b'"k1"', b"k2", b"", b'"', b'"a\\', b"a b", b"\xff\xfe", b"k\x00"]),
    st.binary(max_size=300),
    huge,
)
forwarded = st.one_of(
    st.sampled_from(
        [
            b"203.0.113.7",
            b"203.0.113.7, 127.0.0.1",
            b"unknown, 10.0.0.1",
            b"[2001:db8::1]:4711",
            b"2001:db8::1, ::ffff:127.0.0.1",
            b'for="[2001:db8::1]:80";proto=https, for=127.0.0.1',
            b'for="\\"x";by=_h, for=_hidden',
            b"for=;;;,,,",
            b"300.1.1.1",
            b"\xc3\xa9\xff",
        ]
    ),
    raw_bytes,
    huge,
)


def authorizations(tokens: list[str]) -> st.SearchStrategy[bytes]:
    """``Authorization`` values: valid tokens among malformed ones and other schemes."""
    valid = st.sampled_from(tokens).map(lambda t: b"Bearer " + t.encode())
    bad = st.sampled_from(
        [b"Bearer", b"Bearer ", b"bearer x.y.z", b"Basic YTpi", b"Bearer a.b.c=", b"\xff\xff"]
    )
    return st.one_of(valid, bad, raw_bytes.map(lambda b: b"Bearer " + b), raw_bytes, huge)


def header_lists(tokens: list[str]) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Header lists (names lowercased, as ASGI servers give them), duplicates included:
    often a valid token and key, among hostile fields, in any order."""
    named = st.one_of(
        st.tuples(st.just(b"authorization"), authorizations(tokens)),
        st.tuples(st.just(b"idempotency-key"), keys),
        st.tuples(st.sampled_from([b"x-forwarded-for", b"forwarded"]), forwarded),
        st.tuples(st.just(b"x-api-key"), st.one_of(raw_bytes, huge)),
        st.tuples(
            st.sampled_from([b"content-type", b"content-length", b"host", b"cookie"]),
            st.one_of(st.sampled_from([b"application/json", b"-1", b"99999999999"]), raw_bytes),
        ),
        st.tuples(st.binary(min_size=1, max_size=12), raw_bytes),
    )
    good = st.tuples(
        st.none()
        | st.sampled_from(tokens).map(lambda t: (b"authorization", b"Bearer " + t.encode())),
        st.none() | st.sampled_from([b"k1", b"k2", b'"k3"']).map(lambda k: (b"idempotency-key", k)),
        st.none() | st.sampled_from([b"a", b"b"]).map(lambda k: (b"x-api-key", k)),
    ).map(lambda fields: [f for f in fields if f is not None])
    return st.tuples(good, st.lists(named, max_size=4)).flatmap(
        lambda parts: st.permutations(parts[0] + parts[1])
    )


clients = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(["127.0.0.1", "203.0.113.9", "::1", "unix", "", "\ud800", "999.0.0.1"]),
        st.integers(min_value=0, max_value=65535),
    ),
)


@dataclass
class Sample:
    """One random request: its scope, its body in chunks, and where the client leaves."""

    scope: dict[str, Any]
    chunks: list[bytes]
    disconnect_after: int | None  # leave after this many chunks (None: stay)
    terse: bool = False  # leave out the message keys that have defaults (an empty body...)


def requests(tokens: list[str]) -> st.SearchStrategy[Sample]:
    """Random HTTP scopes with their bodies."""

    @st.composite
    def build(draw: st.DrawFn) -> Sample:
        path = draw(paths)
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": draw(st.sampled_from(["1.0", "1.1", "2"])),
            "method": draw(methods),
            "scheme": draw(st.sampled_from(["http", "https"])),
            "path": path,
            "query_string": draw(raw_bytes),
            "root_path": draw(st.sampled_from(["", "", "/prefix", "/\ud800"])),
            "headers": draw(header_lists(tokens)),
            "client": draw(clients),
            "server": ("testserver", 80),
        }
        if draw(st.booleans()):
            scope["raw_path"] = path.encode("utf-8", "surrogatepass")
        # The keys the ASGI spec makes optional may be missing; headers may come as lists.
        for name in draw(st.sets(st.sampled_from(["scheme", "root_path", "client", "server"]))):
            del scope[name]
        if draw(st.booleans()):
            scope["headers"] = [list(pair) for pair in scope["headers"]]
        body = draw(st.sampled_from([b"", b"{}", b'{"items": [1, 2]}']) | st.binary(max_size=200))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        chunks = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        leave = draw(st.none() | st.integers(min_value=0, max_value=len(chunks)))
        return Sample(scope, chunks, leave, terse=draw(st.booleans()))

    return build()


@dataclass
class Exchange:
    """What the stack sent back for one request."""

    messages: list[Message] = field(default_factory=list)

    @property
    def starts(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.start"]

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )


async def exchange(app: ASGIApp, request: Sample) -> Exchange:
    """Run *request* through *app* like a server: chunks, then a disconnect once answered."""
    out = Exchange()
    answered = asyncio.Event()
    messages: list[Message] = []
    for i, chunk in enumerate(request.chunks[: request.disconnect_after]):
        message: Message = {"type": "http.request"}
        more = i < len(request.chunks) - 1
        if chunk or not request.terse:
            message["body"] = chunk
        if more or not request.terse:
            message["more_body"] = more
        messages.append(message)
    pending: Iterator[Message] = iter(messages)

    async def receive() -> Message:
        message = next(pending, None)
        if message is not None:
            return message
        if request.disconnect_after is None:
            await answered.wait()  # a server reports the disconnect once the response is out
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        assert isinstance(message, dict), message
        assert message["type"] in {"http.response.start", "http.response.body"}, message
        out.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    await asyncio.wait_for(app(request.scope, receive, send), timeout=10)
    return out


# -- the application and its stacks ----------------------------------------------------


def _problem(status: int, detail: str) -> Response:
    return Response(
        problem_body(status, detail), status_code=status, media_type="application/problem+json"
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _problem(exc.status_code, str(exc.detail))


async def echo(request: Request) -> Response:
    """The application: reads the whole body, answers what it saw."""
    try:
        body = await request.body()
    except ClientDisconnect:
        return _problem(400, "the client went away")
    user = request.scope.get("user")
    return JSONResponse(
        {"bytes": len(body), "user": getattr(user, "identity", None)},
        status_code=201 if request.method == "POST" else 200,
    )


async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(getattr(websocket.scope.get("user"), "identity", None) or "-")
    await websocket.close()


def application() -> Starlette:
    """The application behind the stacks: a few routes that read the body and echo."""
    app = Starlette(
        routes=[
            WebSocketRoute("/ws", chat),
            Route("/", echo, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
            Route("/healthz", echo, methods=["GET"]),
            Route("/items", echo, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
            Route("/items/{rest:path}", echo, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
            Route("/api/orders", echo, methods=["POST"]),
            Route("/api/orders/{order_id:int}", echo, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    # Starlette's own slash redirect decodes the query string as UTF-8 and raises on other
    # bytes (starlette 1.10, routing.py): the application's crash, not the middlewares'.
    app.router.redirect_slashes = False
    return app


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer(audience="api") as running:
        yield running


@pytest.fixture(scope="module")
def tokens(issuer: LocalIssuer) -> list[str]:
    """Valid tokens, some of whose claims are hostile in turn."""
    # The stack's clock starts at the real time and is advanced 0.1 s per example.
    valid = {"exp": int(time.time()) + 30 * 86_400}
    return [
        issuer.mint({**valid, "sub": "alice", "scope": "orders:write"}),
        issuer.mint({**valid, "sub": "\ud800bob\x00"}),
        issuer.mint({**valid, "sub": "x" * 600}),
        issuer.mint({**valid, "sub": 42, "scope": ["a", 1]}),
        issuer.mint(valid),
        issuer.mint({"exp": 1}),
    ]


class Builder(Protocol):
    """Build a stack: the middlewares named, outermost first, on *backend* if given."""

    def __call__(
        self, order: tuple[str, ...], optional: bool, backend: RedisBackend | None = None
    ) -> ASGIApp: ...


@pytest.fixture(scope="module")
def build(issuer: LocalIssuer) -> Builder:
    """Stacks of the middlewares named, outermost first. The stores are shared by every
    example, so later requests meet spent buckets, stored responses and reused keys."""
    clock = FakeClock(start=time.time())  # the issuer signs at the real time
    # Each example runs on an event loop of its own: no connection is kept between them.
    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))
    jwks = JWKSClient(issuer.jwks_url, http, clock=clock)
    validator = JWTValidator(jwks, issuer=issuer.issuer, audience="api", clock=clock)
    client = by_ip(
        trusted_proxies=["127.0.0.0/8", "::1"], forwarded_headers=["forwarded", "x-forwarded-for"]
    )
    limiter = RateLimiter(MemoryBackend(), clock=clock)
    store = MemoryBackend()

    def make(
        order: tuple[str, ...], optional: bool, backend: RedisBackend | None = None
    ) -> ASGIApp:
        clock.advance(0.1)  # buckets refill a little between requests, leases run out
        app: ASGIApp = application()
        for name in reversed(order):  # the first named is the outermost
            if name == "auth":
                app = JWTAuthMiddleware(
                    app, validator=validator, optional=optional, exclude=["/healthz"]
                )
            elif name == "ratelimit":
                app = RateLimitMiddleware(
                    app,
                    limiter=limiter if backend is None else RateLimiter(backend, clock=clock),
                    rules=[
                        Rule(
                            TokenBucket("5/second", burst=5), path="/api/*", key=by_user() | client
                        ),
                        Rule(TokenBucket("5/second", burst=5), key=by_header("X-API-Key")),
                        Rule(
                            TokenBucket("5/second", burst=5),
                            key=by_header("X-API-Key", hashed=False) | client,
                            methods=["POST", "PATCH"],
                        ),
                    ],
                )
            else:
                app = IdempotencyMiddleware(
                    app,
                    backend=store if backend is None else backend,
                    required=["/api/orders"],
                    max_request_body=150,
                    clock=clock,
                )
        return app

    return make


def check(exchange: Exchange, request: Sample) -> None:
    """The stack's promise for one request."""
    starts = exchange.starts
    left = request.disconnect_after is not None and request.disconnect_after < len(request.chunks)
    # A client that went away before the end of its body may get no answer at all.
    assert len(starts) <= 1 if left else len(starts) == 1, exchange.messages
    if not starts:
        return
    assert exchange.messages[0] is starts[0], exchange.messages
    status = starts[0]["status"]
    assert 200 <= status < 500, (status, exchange.body)
    ends = [
        m
        for m in exchange.messages
        if m["type"] == "http.response.body" and not m.get("more_body", False)
    ]
    assert len(ends) == 1, exchange.messages
    assert exchange.messages[-1] is ends[0], exchange.messages  # nothing after the end
    if status >= 400:
        headers = {bytes(k).lower(): bytes(v) for k, v in starts[0].get("headers", [])}
        assert headers.get(b"content-type") == b"application/problem+json", (status, headers)
        problem = json.loads(exchange.body)
        assert problem["status"] == status, problem


# Found by this test: a lone surrogate in the path of an idempotent POST.
SURROGATE = Sample(
    {
        "type": "http",
        "method": "POST",
        "path": "/api/orders\ud800",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"idempotency-key", b"k1")],
        "client": ("127.0.0.1", 1),
    },
    [b"{}"],
    None,
)


@FIXTURES
@given(
    order=st.permutations(MIDDLEWARES).flatmap(
        lambda p: st.integers(min_value=1, max_value=3).map(lambda n: tuple(p[:n]))
    ),
    optional=st.booleans(),
    data=st.data(),
)
@example(order=("idempotency",), optional=True, data=None).via("a lone surrogate in the path")
def test_every_stack_answers_every_request(
    build: Builder,
    tokens: list[str],
    order: tuple[str, ...],
    optional: bool,
    data: st.DataObject | None,
) -> None:
    app = build(order, optional)
    request = SURROGATE if data is None else data.draw(requests(tokens), label="request")
    result = asyncio.run(exchange(app, request))
    check(result, request)
    event(f"status {result.starts[0]['status'] if result.starts else None}")


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis server, flushed."""
    if not redis_server.is_running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@FIXTURES
@given(
    order=st.permutations(MIDDLEWARES).flatmap(
        lambda p: st.integers(min_value=1, max_value=3).map(lambda n: tuple(p[:n]))
    ),
    data=st.data(),
)
def test_every_stack_answers_every_request_on_redis(
    build: Builder, tokens: list[str], redis_url: str, order: tuple[str, ...], data: st.DataObject
) -> None:
    # Redis takes only keys that are valid UTF-8: what the memory stores never check.
    optional = data.draw(st.booleans(), label="optional")
    request = data.draw(requests(tokens), label="request")

    async def run() -> Exchange:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            async with RedisBackend(client) as backend:
                return await exchange(build(order, optional, backend), request)
        finally:
            await client.aclose()

    check(asyncio.run(run()), request)


# -- regressions, one per crash the fuzzing found ---------------------------------------


async def test_an_idempotent_post_to_a_path_with_a_lone_surrogate_runs_once() -> None:
    runs = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(scope["path"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    guarded = IdempotencyMiddleware(app, backend=MemoryBackend())
    first = await exchange(guarded, SURROGATE)
    again = await exchange(guarded, SURROGATE)
    assert [m["status"] for m in (*first.starts, *again.starts)] == [201, 201]
    assert (b"idempotent-replayed", b"true") in again.starts[0]["headers"]
    assert runs == ["/api/orders\ud800"]


def test_a_lone_surrogate_gets_a_fingerprint_and_a_storable_scope_key() -> None:
    def scope(path: str) -> dict[str, Any]:
        return {"type": "http", "method": "POST", "path": path, "headers": []}

    hostile, spelled = scope("/a\ud800"), scope("/a\\ud800")
    assert fingerprint_request(hostile, b"") != fingerprint_request(spelled, b"")
    assert default_scope_key(hostile, "k").encode("utf-8")  # what Redis needs
    # A path a server can deliver keeps its key, so stored records stay found.
    assert default_scope_key(scope("/caf\u00e9"), "k") == "\x1fPOST\x1f/caf\u00e9\x1fk"


def test_a_user_whose_identity_holds_a_lone_surrogate_gets_a_storable_key() -> None:
    class User:
        is_authenticated = True
        identity = "\ud800bob"

    key = by_user()({"type": "http", "user": User()})
    assert key is not None
    assert key.encode("utf-8") == b"user:\\ud800bob"  # what a Redis key must be
    User.identity = "z\u00fc"
    assert by_user()({"type": "http", "user": User()}) == "user:z\u00fc"


async def test_on_redis_a_lone_surrogate_in_a_path_or_identity_is_stored_and_counted(
    redis_client: redis.asyncio.Redis,
) -> None:
    class User:
        is_authenticated = True
        identity = "\ud800bob"

    runs = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(scope["path"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    async with RedisBackend(redis_client) as backend:
        limited = RateLimitMiddleware(
            IdempotencyMiddleware(app, backend=backend),
            limiter=RateLimiter(backend),
            rules=[Rule(TokenBucket("1/minute", burst=1), key=by_user())],
        )
        request = Sample({**SURROGATE.scope, "user": User()}, [b"{}"], None)
        first = await exchange(limited, request)
        again = await exchange(limited, request)
    assert [m["status"] for m in (*first.starts, *again.starts)] == [201, 429]
    assert runs == ["/api/orders\ud800"]
    assert await redis_client.keys("*user:\\\\ud800bob*")


@FIXTURES
@given(
    order=st.permutations(MIDDLEWARES),
    optional=st.booleans(),
    data=st.data(),
)
def test_every_stack_answers_every_websocket(
    build: Builder, tokens: list[str], order: tuple[str, ...], optional: bool, data: st.DataObject
) -> None:
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": data.draw(st.sampled_from(["/ws", "/ws", "/nope"]) | paths),
        "query_string": data.draw(raw_bytes),
        "headers": data.draw(header_lists(tokens)),
        "client": data.draw(clients),
        "subprotocols": [],
    }
    sent: list[Message] = []

    async def run() -> None:
        closed = asyncio.Event()
        incoming = iter([{"type": "websocket.connect"}])

        async def receive() -> Message:
            message = next(incoming, None)
            if message is not None:
                return message
            await closed.wait()
            return {"type": "websocket.disconnect", "code": 1000}

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "websocket.close":
                closed.set()

        await asyncio.wait_for(build(order, optional)(scope, receive, send), timeout=10)

    asyncio.run(run())
    kinds = [m["type"] for m in sent]
    assert kinds[0] in {"websocket.accept", "websocket.close"}, sent
    assert kinds.count("websocket.close") == 1, sent
    assert kinds[-1] == "websocket.close", sent
    event(f"{kinds[0]} {sent[-1].get('code')}")


def test_every_stack_passes_the_lifespan_through(build: Builder) -> None:
    sent: list[Message] = []

    async def run() -> None:
        incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> Message:
            return next(incoming)

        async def send(message: Message) -> None:
            sent.append(message)

        app = build(MIDDLEWARES, False)
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    asyncio.run(run())
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
