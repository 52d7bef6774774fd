"""Several processes of the shop on one Redis behave as one shop: the real server
(``python -m examples.ecommerce --workers 2``), real HTTP, a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from examples.ecommerce.__main__ import wait_until_up
from resilient.testing import RedisServer

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def shop(fresh_redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A shop of two worker processes on one Redis; its URL and its database file."""
    port, payments = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": fresh_redis_server.url,
        "SHOP_DATA_DIR": str(tmp_path),
        "SHOP_PRODUCTS": "200",
        "SHOP_TRUSTED_PROXIES": "127.0.0.1/32",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.ecommerce", "--port", str(port),
         "--payment-port", str(payments), "--workers", str(WORKERS)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", timeout=60)
        yield f"http://127.0.0.1:{port}", tmp_path / "shop.sqlite3"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


async def login(client: httpx.AsyncClient, user: str, password: str, ip: str) -> httpx.Response:
    return await client.post(
        "/api/login",
        json={"username": user, "password": password},
        headers={"X-Forwarded-For": ip},
    )


async def served_by_every_worker(client: httpx.AsyncClient) -> bool:
    """Whether fresh connections reached every process."""
    processes = set()
    for _ in range(40):
        async with httpx.AsyncClient(base_url=client.base_url) as fresh:
            processes.add((await fresh.get("/healthz")).json()["process"])
    return len(processes) == WORKERS


@pytest.mark.slow
async def test_two_processes_on_one_redis_behave_as_one_shop(shop: tuple[str, Path]) -> None:
    url, database = shop
    limits = httpx.Limits(max_keepalive_connections=0)  # a new connection, maybe a new worker
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        assert await served_by_every_worker(client)

        # The per-account limit holds whichever process each guess reaches.
        guesses = [
            (await login(client, "alice", f"guess-{n}", f"10.0.0.{n}")).status_code
            for n in range(6)
        ]
        assert guesses == [401] * 5 + [429]

        # One order per idempotency key, whichever processes the copies reach.
        token = (await login(client, "bob", "builder", "10.0.1.1")).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "twice"}
        order = {"items": [{"product_id": 1, "quantity": 1}]}
        copies = [await client.post("/api/orders", json=order, headers=headers) for _ in range(6)]
        assert [r.status_code for r in copies] == [201] * 6
        assert [r.headers.get("idempotent-replayed") for r in copies[1:]] == ["true"] * 5
        assert len({r.content for r in copies}) == 1

        # No oversell: the last 3 units, 12 buyers at once, on both processes.
        with sqlite3.connect(database) as db:
            db.execute("UPDATE products SET stock = 3 WHERE id = 2")
        tokens = [
            (await login(client, f"customer{n:03d}", f"password-{n}", f"10.0.2.{n}")).json()[
                "access_token"
            ]
            for n in range(1, 13)
        ]

        async def buy(n: int) -> int:
            response = await client.post(
                "/api/orders",
                json={"items": [{"product_id": 2, "quantity": 1}]},
                headers={"Authorization": f"Bearer {tokens[n]}", "Idempotency-Key": f"b{n}"},
            )
            return response.status_code

        statuses = await asyncio.gather(*(buy(n) for n in range(12)))
    assert sorted(statuses) == [201] * 3 + [409] * 9
    with sqlite3.connect(database) as db:
        (stock,) = db.execute("SELECT stock FROM products WHERE id = 2").fetchone()
        (orders,) = db.execute("SELECT count(*) FROM orders WHERE status = 'paid'").fetchone()
    assert stock == 0
    assert orders == 1 + 3
