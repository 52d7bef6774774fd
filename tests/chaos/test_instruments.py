"""The suite's own instruments: the shop's record of handler runs, its lease setting, and
the TCP proxy (forwarding, latency, dropped connections)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.ecommerce.runlog import counted
from examples.ecommerce.settings import Settings
from resilient.testing import RedisServer
from tests.chaos.proxy import ChaosProxy


async def test_each_run_of_a_counted_handler_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"

    async def handler(request: Request) -> Response:
        if request.headers.get("idempotency-key") == "bad":
            raise HTTPException(422, "no")
        return JSONResponse({}, status_code=201)

    app = Starlette(routes=[Route("/", counted(handler, log), methods=["POST"])])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        for key in ("a", "a", "bad"):
            await client.post("/", headers={"Idempotency-Key": key})
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["key"], r["status"]) for r in runs] == [("a", 201), ("a", 201), ("bad", 422)]
    assert all(r["began"] <= r["at"] for r in runs)  # when each run began, and ended
    assert runs[0]["at"] <= runs[1]["began"]


def test_without_a_log_the_handler_is_not_wrapped() -> None:
    async def handler(request: Request) -> Response:
        return Response()

    assert counted(handler, None) is handler


def test_the_lease_and_the_run_log_come_from_the_environment() -> None:
    settings = Settings.from_env({"SHOP_IDEMPOTENCY_LEASE": "2.5", "SHOP_RUN_LOG": "/tmp/r"})
    assert settings.idempotency_lease == 2.5
    assert settings.run_log == Path("/tmp/r")
    assert Settings.from_env({}).run_log is None
    assert Settings.from_env({}).idempotency_lease == 30.0
    with pytest.raises(ValueError, match="SHOP_IDEMPOTENCY_LEASE"):
        Settings.from_env({"SHOP_IDEMPOTENCY_LEASE": "soon"})


@pytest.mark.redis
def test_the_proxy_forwards_delays_and_drops(redis_server: RedisServer) -> None:
    if not redis_server.is_running:
        redis_server.start()
    proxy = ChaosProxy((redis_server.host, redis_server.port))
    proxy.start()

    def ping(sock: socket.socket) -> bytes:
        sock.sendall(b"PING\r\n")
        return sock.recv(100)

    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
            assert ping(sock) == b"+PONG\r\n"
            proxy.set_latency(0.1)
            started = time.monotonic()
            assert ping(sock) == b"+PONG\r\n"
            assert time.monotonic() - started >= 0.2  # each way
            proxy.set_latency(0.0)
            assert proxy.drop() == 2  # the client's side and Redis's
            with pytest.raises(ConnectionResetError):
                ping(sock)  # aborted: a reset, as a broken network gives
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
            assert ping(sock) == b"+PONG\r\n"  # a new connection goes through
    finally:
        proxy.close()
