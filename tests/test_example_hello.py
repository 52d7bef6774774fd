"""The quickstart's example server really runs, rate-limits and replays retried orders."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from examples.hello import create_app
from resilient import RateLimiter
from resilient._asgi import ASGIApp
from resilient.testing import FakeClock


def client(app: ASGIApp, ip: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://example")


async def test_the_example_limits_login_and_api_calls() -> None:
    app = create_app(RateLimiter(clock=FakeClock()))
    async with client(app, "203.0.113.5") as attacker, client(app, "203.0.113.6") as reader:
        logins = [(await attacker.post("/api/login")).status_code for _ in range(4)]
        hellos = [(await reader.get("/api/hello")).status_code for _ in range(6)]
        health = [(await reader.get("/healthz")).status_code for _ in range(20)]
    assert logins == [200, 200, 200, 429]
    assert hellos == [200] * 5 + [429]  # the burst of 5 is spent
    assert health == [200] * 20


async def test_the_example_creates_one_order_per_idempotency_key() -> None:
    app = create_app(RateLimiter(clock=FakeClock()))
    key = {"Idempotency-Key": '"order-1"'}
    async with client(app, "203.0.113.8") as shopper:
        first = await shopper.post("/api/orders", json={"sku": "A1"}, headers=key)
        retry = await shopper.post("/api/orders", json={"sku": "A1"}, headers=key)
        keyless = await shopper.post("/api/orders", json={"sku": "A1"})
    assert first.status_code == retry.status_code == 201
    assert retry.content == first.content
    assert retry.headers["idempotent-replayed"] == "true"
    assert keyless.status_code == 400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_example_server_runs_under_uvicorn() -> None:
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "examples.hello", "--port", str(port)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the example server did not start"
                time.sleep(0.1)
        statuses = [httpx.post(f"{base}/api/login").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        denied = httpx.post(f"{base}/api/login")
        assert denied.headers["content-type"] == "application/problem+json"
        assert int(denied.headers["retry-after"]) > 0
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_the_example_composes_fallback_retry_breaker_and_timeout() -> None:
    from resilient.testing import retries_without_waits

    app = create_app(RateLimiter(clock=FakeClock()))
    async with client(app, "203.0.113.9") as user:
        assert (await user.get("/api/forecast")).json() == {"forecast": "sunny"}
        await user.post("/api/upstream?outage=1")
        with retries_without_waits():
            first = (await user.get("/api/forecast")).json()
            second = (await user.get("/api/forecast")).json()
        outage = (await user.post("/api/upstream?outage=1")).json()
    assert first == {"forecast": "unknown", "fallback": "upstream failed"}
    # 3 attempts failed, then 1 more: 4 failures in the window open the breaker, and the
    # retry does not wait 30 s for it (past its 2 s deadline): the fallback answers at once.
    assert second == {"forecast": "unknown", "fallback": "circuit open"}
    assert outage["breaker"] == "open"
