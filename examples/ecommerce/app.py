"""The shop: a Starlette API over SQLite, guarded by every block of ``resilient``.

Requests go through, outermost first::

    JWTAuthMiddleware      bearer tokens checked against the issuer's JWKS (optional on
                           public routes; an invalid token is refused everywhere)
    RateLimitMiddleware    the login form per client IP; the whole API per user (or IP)
    IdempotencyMiddleware  POST /api/orders needs an Idempotency-Key: replays, 409, 422
    Starlette routes       catalog (Cache), login (per-username limit), orders (payment
                           through ResilientTransport: retry + circuit breaker + timeout)

With ``REDIS_URL`` set, every block keeps its state in Redis, so several processes of the
shop behave as one: the same limits, one order per idempotency key, one catalog load per
key, one circuit for the payment provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.ecommerce.db import UPDATABLE, Database, NotFound, OutOfStock, ProductQuery
from examples.ecommerce.issuer import Issuer
from examples.ecommerce.runlog import counted
from examples.ecommerce.settings import Settings
from resilient import (
    Cache,
    CircuitBreaker,
    CircuitOpenError,
    Clock,
    Forbidden,
    IdempotencyMiddleware,
    JWKSClient,
    JWTAuthMiddleware,
    JWTValidator,
    LoggingObserver,
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    ResilienceError,
    ResilientTransport,
    Rule,
    SlidingWindow,
    SystemClock,
    TokenBucket,
    authorize,
    by_ip,
    by_user,
    retry,
)
from resilient.events import observe_all
from resilient.problem import problem_body
from resilient.prometheus import PrometheusObserver

__all__ = ["Shop", "create_app"]

PROBLEM = "application/problem+json"
# The protection space named in every WWW-Authenticate challenge, the middleware's and ours.
REALM = "api"


def problem(
    status: int, detail: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> Response:
    """An RFC 9457 problem response."""
    body = problem_body(status, detail, extra=extra or None)
    return Response(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (404, 405, 403 from ``authorize``...) as problem bodies."""
    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, str(exc.detail), headers=exc.headers)


async def forbidden(request: Request, exc: Exception) -> Response:
    """A token that lacks a scope, role or group: 403 (RFC 6750 ``insufficient_scope``)."""
    assert isinstance(exc, Forbidden)
    challenge = f'Bearer realm="{REALM}", error="insufficient_scope", error_description="{exc}"'
    return problem(403, str(exc), headers={"WWW-Authenticate": challenge})


async def finish(work: Awaitable[None]) -> None:
    """Await *work* to its end even if the caller is cancelled meanwhile (then re-raise).

    An order's settlement (paid, or cancelled with its stock given back) must not stop
    half-way because the client went away.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


def redis_client(url: str) -> Any:
    """A redis-py asyncio client for *url*; ``redis+cluster://`` gives a cluster client."""
    # Short timeouts: a Redis outage must reach each block's failure policy quickly.
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1),
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


async def json_body(request: Request) -> Any:
    """The request's JSON body, or a 400 problem."""
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, "the body must be a JSON document") from exc


def subject(request: Request) -> tuple[str, dict[str, Any]]:
    """The caller's user id (the ``sub`` claim) and verified claims.

    401 when the request carries no token, or a token that names no user: an external
    issuer's token may lack ``sub`` (a machine's client-credentials token) or hold one
    that is not a string.
    """
    user = request.scope.get("user")
    if user is None or not user.is_authenticated:
        raise HTTPException(
            401,
            "this endpoint needs a bearer token",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )
    claims: dict[str, Any] = dict(user.claims)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        detail = "the token names no user (no sub claim, or not a string)"
        challenge = f'Bearer realm="{REALM}", error="invalid_token", error_description="{detail}"'
        raise HTTPException(401, detail, headers={"WWW-Authenticate": challenge})
    return sub, claims


def order_lines(body: Any) -> dict[int, int]:
    """The order's lines as product id -> quantity, or a 422 problem."""
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 0 < len(items) <= 20:
        raise HTTPException(422, "items must be a list of 1 to 20 lines")
    wanted: dict[int, int] = {}
    for line in items:
        product_id = line.get("product_id") if isinstance(line, dict) else None
        quantity = line.get("quantity", 1) if isinstance(line, dict) else None
        if (
            isinstance(product_id, bool)
            or not isinstance(product_id, int)
            or isinstance(quantity, bool)
            or not isinstance(quantity, int)
            or not 0 < quantity <= 100
        ):
            raise HTTPException(422, "each line needs an integer product_id and quantity 1-100")
        wanted[product_id] = wanted.get(product_id, 0) + quantity
    return wanted


class Shop:
    """The service's parts; :meth:`asgi` wires them into the application."""

    def __init__(
        self,
        settings: Settings,
        *,
        payment_transport: httpx.AsyncBaseTransport | None = None,
        jwks_transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock = clock or SystemClock()
        self.db = Database(settings.database, products=settings.products, seed=settings.seed)
        self.db.prepare()
        # Events go to the log and, as metrics, to /metrics.
        self.registry = CollectorRegistry()
        self.observer = observer = observe_all(
            LoggingObserver(), PrometheusObserver(registry=self.registry)
        )
        self.redis = redis_client(settings.redis_url) if settings.redis_url else None
        self.backend: MemoryBackend | RedisBackend = (
            RedisBackend(self.redis, prefix="shop") if self.redis is not None else MemoryBackend()
        )
        shared = self.backend if isinstance(self.backend, RedisBackend) else None
        self.idempotency: IdempotencyMiddleware | None = None  # made by asgi()
        self.limiter = RateLimiter(self.backend, clock=clock, deny_cache=10_000, observer=observer)
        self.login_policy = SlidingWindow(settings.login_user_rate, block_for=settings.login_block)
        self.cache = Cache(
            self.backend,
            ttl=300,
            stale_while_revalidate=30,
            negative_ttl=30,
            clock=clock,
            observer=observer,
        )
        self.issuer = Issuer(
            settings.signing_key,
            issuer=settings.public_url,
            audience=settings.audience,
            lifetime=settings.token_lifetime,
        )
        self.jwks_http = httpx.AsyncClient(transport=jwks_transport, timeout=5.0)
        if settings.oidc_issuer:
            # An external identity provider (a Cognito user pool, say): its access tokens
            # carry no audience but the app client's id, and groups instead of roles.
            jwks = JWKSClient(
                settings.oidc_issuer.rstrip("/") + "/.well-known/jwks.json",
                self.jwks_http,
                clock=clock,
                observer=observer,
            )
            self.validator = JWTValidator(
                jwks,
                issuer=settings.oidc_issuer,
                audience=None,
                token_use="access",
                client_id=settings.oidc_client_id,
                algorithms=["RS256"],
                clock=clock,
                observer=observer,
            )
            self.admin = authorize(groups=["admin"])
        else:
            jwks = JWKSClient(
                settings.public_url + "/.well-known/jwks.json",
                self.jwks_http,
                clock=clock,
                observer=observer,
            )
            self.validator = JWTValidator(
                jwks,
                issuer=settings.public_url,
                audience=settings.audience,
                algorithms=["ES256"],
                typ="at+jwt",
                clock=clock,
                observer=observer,
            )
            self.admin = authorize(roles=["admin"])
        self.payments_breaker = CircuitBreaker(
            "payments",
            failure_rate=0.5,
            minimum_calls=4,
            window=20,
            open_for=settings.breaker_open_for,
            backend=shared,
            clock=clock,
            observer=observer,
        )
        self.payments = httpx.AsyncClient(
            base_url=settings.payment_url,
            transport=ResilientTransport(
                payment_transport or httpx.AsyncHTTPTransport(),
                breaker=self.payments_breaker,
                retry=retry(
                    attempts=3, deadline=3.0, base=0.1, cap=0.5, clock=clock, observer=observer
                ),
                timeout=2.0,
            ),
        )
        self.catalog_loads = Counter(
            "shop_catalog_loads",
            "Catalog reads that reached the database (cache misses that loaded)",
            ["kind"],
            registry=self.registry,
        )
        self.orders = Counter(
            "shop_orders", "Order requests by outcome", ["outcome"], registry=self.registry
        )

    async def aclose(self) -> None:
        """Release connections: HTTP clients, Redis, the database."""
        await self.payments.aclose()
        await self.jwks_http.aclose()
        await self.cache.aclose()
        if isinstance(self.backend, RedisBackend):
            await self.backend.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        self.db.close()

    # -- catalog ------------------------------------------------------------------------

    async def list_products(self, request: Request) -> Response:
        try:
            query = ProductQuery.from_params(request.query_params)
        except ValueError as exc:
            return problem(400, str(exc))

        async def load() -> dict[str, Any]:
            self.catalog_loads.labels("list").inc()
            return await self.db.search(query)

        page = await self.cache.get_or_load(
            f"products:{query.cache_key()}", load, ttl=60, tags=["catalog"]
        )
        return JSONResponse(page)

    async def get_product(self, request: Request) -> Response:
        product_id = request.path_params["product_id"]

        async def load() -> dict[str, Any] | None:
            self.catalog_loads.labels("item").inc()
            return await self.db.product(product_id)

        product = await self.cache.get_or_load(
            f"product:{product_id}", load, tags=[f"product:{product_id}"]
        )
        if product is None:
            return problem(404, f"no product {product_id}")
        return JSONResponse(product)

    async def update_product(self, request: Request) -> Response:
        subject(request)
        self.admin.check_scope(request.scope)
        product_id = request.path_params["product_id"]
        changes = await json_body(request)
        if not isinstance(changes, dict) or not changes:
            return problem(422, "the body must be an object of fields to change")
        unknown = sorted(set(changes) - UPDATABLE)
        if unknown:
            return problem(422, f"fields that cannot be changed: {', '.join(unknown)}")
        for name in ("price_cents", "stock"):
            value = changes.get(name)
            if name in changes and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9
            ):
                return problem(422, f"{name} must be an integer between 0 and 10**9")
        for name in ("name", "description"):
            value = changes.get(name)
            if name in changes and (not isinstance(value, str) or not 0 < len(value) <= 500):
                return problem(422, f"{name} must be a string of 1 to 500 characters")
        try:
            product = await self.db.update_product(product_id, changes)
        except NotFound:
            return problem(404, f"no product {product_id}")
        # The product's own entry and every cached page of the catalog.
        await self.cache.invalidate_tags([f"product:{product_id}", "catalog"])
        return JSONResponse(product)

    # -- login --------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if self.settings.oidc_issuer:
            return problem(404, "sign in at the identity provider: " + self.settings.oidc_issuer)
        body = await json_body(request)
        username = body.get("username") if isinstance(body, dict) else None
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(username, str) or not isinstance(password, str):
            return problem(422, "username and password (strings) are required")
        if not 0 < len(username) <= 64 or len(password) > 256:
            return problem(422, "username or password too long")
        # Every attempt on a username counts, right or wrong: a password guessed on the
        # sixth try is refused all the same. A successful login clears the count.
        key = f"login:{username.casefold()}"
        decision = await self.limiter.hit(key, self.login_policy)
        if not decision.allowed:
            retry_after = max(1, math.ceil(decision.retry_after))
            return problem(
                429,
                "too many sign-in attempts for this account; try again later",
                headers={"Retry-After": str(retry_after)},
            )
        user = await self.db.authenticate(username, password)
        if user is None:
            return problem(401, "wrong username or password")
        await self.limiter.reset(key, self.login_policy)
        token = self.issuer.mint(user, now=self.clock.time())
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.settings.token_lifetime,
                "user_id": str(user["id"]),
            }
        )

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(self.issuer.jwks(), headers={"Cache-Control": "max-age=300"})

    # -- orders -------------------------------------------------------------------------

    async def create_order(self, request: Request) -> Response:
        user_id, _ = subject(request)
        authorize(scopes=["orders:write"]).check_scope(request.scope)
        wanted = order_lines(await json_body(request))
        try:
            order = await self.db.reserve(user_id, wanted)
        except NotFound as exc:
            return problem(422, f"no product {exc.args[0]}")
        except OutOfStock as exc:
            self.orders.labels("out_of_stock").inc()
            return problem(409, str(exc), product_id=exc.product_id, left=exc.left)
        # From here the stock is reserved: whatever the payment step does (an answer, an
        # error, a bug, the request cancelled), the order ends paid or cancelled with its
        # stock given back, not pending. Nothing but the database runs between the
        # reservation and the payment: a cache fault cannot interrupt it.
        try:
            try:
                charged = await self.charge(order)
            except BaseException:  # the request cancelled (the client went away), or a bug
                await finish(self.db.cancel(order["id"]))
                raise
            if isinstance(charged, Response):  # refused: nothing was charged
                await finish(self.db.cancel(order["id"]))
                return charged
            await finish(self.db.mark_paid(order["id"], charged))
        finally:
            # Only now, the order's transaction committed (paid, or cancelled and the stock
            # back), are the cached products stale. A failed delete is reported by the
            # cache and done when Redis answers again; it never fails the order.
            for product_id in wanted:
                await self.cache.delete(f"product:{product_id}")
        self.orders.labels("paid").inc()
        order.update(status="paid", payment_id=charged)
        return JSONResponse(
            order, status_code=201, headers={"Location": f"/api/orders/{order['id']}"}
        )

    async def charge(self, order: Mapping[str, Any]) -> str | Response:
        """Charge *order*: the payment's id, or the 503 to answer when nothing was charged."""
        try:
            response = await self.payments.post(
                "/charges",
                json={"amount_cents": order["total_cents"], "reference": f"order-{order['id']}"},
                # The provider's own idempotency key: retried charges are charged once.
                headers={"Idempotency-Key": f"shop-order-{order['id']}"},
            )
            response.raise_for_status()
            body = response.json()
        except CircuitOpenError as exc:
            self.orders.labels("payment_circuit_open").inc()
            retry_after = max(1, math.ceil(exc.retry_after or 1))
            return problem(
                503,
                "payments are unavailable right now; nothing was charged",
                headers={"Retry-After": str(retry_after)},
            )
        except (httpx.HTTPError, ValueError, ResilienceError):
            body = None
        payment_id = body.get("id") if isinstance(body, dict) else None
        if (
            isinstance(payment_id, bool)
            or not isinstance(payment_id, str | int)
            or payment_id == ""
        ):
            self.orders.labels("payment_failed").inc()
            return problem(
                503,
                "the payment provider failed; nothing was charged",
                headers={"Retry-After": "5"},
            )
        return str(payment_id)

    async def user_orders(self, request: Request) -> Response:
        caller, _ = subject(request)
        user_id = request.path_params["user_id"]
        if user_id != caller:
            self.admin.check_scope(request.scope)  # 403 unless an admin asks
        return JSONResponse({"orders": await self.db.orders_of(user_id)})

    async def get_order(self, request: Request) -> Response:
        caller, _ = subject(request)
        order_id = request.path_params["order_id"]
        order = await self.db.order(order_id)
        if order is None:
            return problem(404, f"no order {order_id}")
        if order["user_id"] != caller:
            self.admin.check_scope(request.scope)  # 403 unless an admin asks
        return JSONResponse(order)

    # -- operations ---------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        # The process id tells apart the workers of one shop (``--workers N``).
        return JSONResponse({"status": "ok", "process": os.getpid()})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            await self.db.ping()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"failed: {type(exc).__name__}"
        if self.redis is not None:
            try:
                await self.redis.ping()
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = f"failed: {type(exc).__name__}"
        if self.idempotency is not None and self.idempotency.quarantine_left > 0:
            left = self.idempotency.quarantine_left
            checks["idempotency"] = f"quarantined for {left:.0f} s: Redis lost its records"
        if all(value == "ok" for value in checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        return problem(503, "a dependency is not ready", checks=checks)

    async def metrics(self, request: Request) -> Response:
        return Response(
            generate_latest(self.registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # -- wiring -------------------------------------------------------------------------

    def asgi(self) -> Any:
        """The application, behind the middleware, outermost first as documented."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await self.aclose()

        app = Starlette(
            routes=[
                Route("/api/products", self.list_products, methods=["GET"]),
                Route("/api/products/{product_id:int}", self.get_product, methods=["GET"]),
                Route(
                    "/api/products/{product_id:int}",
                    self.update_product,
                    methods=["PUT"],
                ),
                Route("/api/login", self.login, methods=["POST"]),
                Route(
                    "/api/orders",
                    counted(self.create_order, self.settings.run_log),
                    methods=["POST"],
                ),
                Route("/api/orders/{order_id:int}", self.get_order, methods=["GET"]),
                Route("/api/users/{user_id}/orders", self.user_orders, methods=["GET"]),
                Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics),
            ],
            exception_handlers={HTTPException: http_error, Forbidden: forbidden},
            lifespan=lifespan,
        )
        client = by_ip(trusted_proxies=list(self.settings.trusted_proxies))
        # quarantine: after Redis lost its records, refuse orders for one lease, so no
        # duplicate of an order that was in flight at the loss runs alongside it.
        self.idempotency = guarded = IdempotencyMiddleware(
            app,
            backend=self.backend,
            required=["/api/orders"],
            lease=self.settings.idempotency_lease,
            clock=self.clock,
            observer=self.observer,
            quarantine=self.settings.idempotency_lease,
        )
        limited = RateLimitMiddleware(
            guarded,
            limiter=self.limiter,
            rules=[
                Rule(
                    SlidingWindow(self.settings.login_ip_rate, block_for=300),
                    path="/api/login",
                    methods=["POST"],
                    key=client,
                ),
                Rule(
                    TokenBucket(self.settings.api_rate, burst=self.settings.api_burst),
                    path="/api/*",
                    key=by_user() | client,
                ),
            ],
        )
        return JWTAuthMiddleware(
            limited,
            validator=self.validator,
            optional=True,
            exclude=["/healthz", "/readyz", "/metrics", "/.well-known/*"],
            realm=REALM,
        )


def create_app(settings: Settings | None = None) -> Any:
    """The shop's ASGI application, configured from the environment by default.

    ``uvicorn --factory examples.ecommerce.app:create_app`` serves it.
    """
    shop = Shop(settings or Settings.from_env())
    return shop.asgi()
