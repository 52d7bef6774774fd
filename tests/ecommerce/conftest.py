"""The example shop, built in process: its payment provider and its own JWKS endpoint are
reached through real ASGI transports, its state in memory or in a real Redis."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio

from examples.ecommerce.app import Shop
from examples.ecommerce.db import Database
from examples.ecommerce.payments import PaymentProvider
from examples.ecommerce.settings import Settings
from resilient.testing import FakeClock, RedisCluster, RedisServer, retries_without_waits

PRODUCTS = 500


class LateASGITransport(httpx.AsyncBaseTransport):
    """An ASGI transport to an app that exists only after the transport (the shop's own
    JWKS endpoint, fetched by the shop)."""

    def __init__(self) -> None:
        self.app: Any = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))
        return await transport.handle_async_request(request)


class Harness:
    """One shop instance and what a test needs around it."""

    def __init__(self, shop: Shop, provider: PaymentProvider, clock: FakeClock) -> None:
        self.shop = shop
        self.provider = provider
        self.clock = clock
        self.app = shop.asgi()

    def client(self, ip: str = "203.0.113.7") -> httpx.AsyncClient:
        """An HTTP client of the shop, connecting from *ip*."""
        transport = httpx.ASGITransport(app=self.app, client=(ip, 50000))
        return httpx.AsyncClient(transport=transport, base_url="http://shop.test")

    async def login(self, username: str, password: str) -> dict[str, str]:
        """Sign in; the ``Authorization`` header of the user."""
        async with self.client(ip=f"198.51.100.{len(username)}") as client:
            response = await client.post(
                "/api/login", json={"username": username, "password": password}
            )
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture(scope="session")
def seeded_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded database file, made once: each shop starts from a copy."""
    path = tmp_path_factory.mktemp("shop-template") / "shop.sqlite3"
    database = Database(path, products=PRODUCTS)
    database.prepare()
    database.close()
    return path


ShopFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture(params=["memory", "redis", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """Each test runs on the embedded defaults, on a real Redis and on a real Redis
    Cluster (flushed first)."""
    if request.param == "memory":
        return None
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        for host, port in cluster.nodes:
            node = redis.Redis(host=host, port=port)
            if node.info("replication")["role"] == "master":
                node.flushall()
            node.close()
        return cluster.url.replace("redis://", "redis+cluster://", 1)
    # "fresh": a server of the test's own, which the test may stop.
    name = "fresh_redis_server" if request.param == "fresh" else "redis_server"
    server: RedisServer = request.getfixturevalue(name)
    if not server.is_running:
        server.start()
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
async def make_shop(
    tmp_path: Path, seeded_database: Path, redis_url: str | None
) -> AsyncIterator[ShopFactory]:
    """Build shops sharing one data directory (and one Redis, when there is one): several
    instances of one service."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(seeded_database, data_dir / "shop.sqlite3")
    clock = FakeClock()
    provider = PaymentProvider(seed=1)
    built: list[Shop] = []

    async def make(*, own_jwks: bool = True, payment_app: Any = None, **overrides: Any) -> Harness:
        """A shop with *overrides* of the settings; with *own_jwks*, its JWKS fetches
        reach itself in process (else over the network, as configured); its payments go
        to *payment_app* (an ASGI app) instead of the test's provider when given."""
        settings = Settings(
            data_dir=data_dir,
            redis_url=redis_url,
            public_url="http://127.0.0.1:8000",
            payment_url="http://127.0.0.1:8001",
            products=PRODUCTS,
            **overrides,
        )
        jwks = LateASGITransport()
        shop = Shop(
            settings,
            payment_transport=httpx.ASGITransport(app=payment_app or provider.app),
            jwks_transport=jwks if own_jwks else None,
            clock=clock,
        )
        built.append(shop)
        harness = Harness(shop, provider, clock)
        jwks.app = harness.app
        return harness

    yield make
    for shop in built:
        await shop.aclose()


@pytest.fixture
async def harness(make_shop: ShopFactory) -> Harness:
    """One shop."""
    return await make_shop()


@pytest.fixture(autouse=True)
def _no_retry_waits() -> Iterator[None]:
    with retries_without_waits():
        yield
