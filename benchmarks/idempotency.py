"""Idempotency keys, side by side with asgi-idempotency-header, in one run.

Each contender wraps the same Starlette app (``POST /api/orders`` answering a small JSON
body) and is called in process, one request at a time, so that what is measured is the
middleware's own cost plus its store's round trips:

* ``first``: every request carries a new key (claim, run, store the response);
* ``replay``: every request repeats one key (the stored response is sent back).

Redis runs on a dedicated local ``redis-server``. The last column counts the commands
clients sent per request, from ``INFO commandstats``: each is one round trip here, since
no contender pipelines one request's commands. ``INFO`` also counts the commands a Lua
script runs, so for scripts only the ``EVALSHA``/``EVAL`` calls are counted. The design
promises one round trip to claim plus one to store, and one to replay.

Every figure is the median of ``--repeat`` runs; contenders alternate within each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks._common import Cell, Machine, Report, Section, run_cli
from resilient import IdempotencyMiddleware, MemoryBackend, RedisBackend
from resilient.testing import RedisServer, find_redis_server

PACKAGES = ["resilient-asgi", "asgi-idempotency-header", "redis", "hiredis", "starlette"]
BODY = b'{"sku":"A1","quantity":2}'


async def create_order(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"id": 1, "status": "created", "total": 1999}, status_code=201)


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/api/orders", create_order, methods=["POST"])])


def contenders(client: redis.asyncio.Redis) -> dict[str, tuple[Any, bool]]:
    """Name -> (app, uses Redis)."""
    apps: dict[str, tuple[Any, bool]] = {
        "bare Starlette": (starlette_app(), False),
        "resilient, memory": (IdempotencyMiddleware(starlette_app(), MemoryBackend()), False),
        "resilient, Redis": (IdempotencyMiddleware(starlette_app(), RedisBackend(client)), True),
    }
    try:
        from idempotency_header_middleware import IdempotencyHeaderMiddleware
        from idempotency_header_middleware.backends import MemoryBackend as TheirMemory
        from idempotency_header_middleware.backends import RedisBackend as TheirRedis
    except ImportError as exc:  # pragma: no cover - the bench extra installs it
        print(f"asgi-idempotency-header is not available: {exc}", file=sys.stderr)
        return apps
    apps["asgi-idempotency-header, memory"] = (
        IdempotencyHeaderMiddleware(starlette_app(), backend=TheirMemory()),
        False,
    )
    apps["asgi-idempotency-header, Redis"] = (
        IdempotencyHeaderMiddleware(starlette_app(), backend=TheirRedis(client)),
        True,
    )
    return apps


async def per_request_us(app: Any, n: int, key: Callable[[int], bytes]) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = time.perf_counter_ns()
    for i in range(n):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/api/orders",
            "raw_path": b"/api/orders",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"bench"),
                (b"content-type", b"application/json"),
                (b"idempotency-key", key(i)),
            ],
            "client": ("203.0.113.7", 40000),
            "server": ("bench", 80),
        }
        await app(scope, receive, send)
    elapsed = (time.perf_counter_ns() - start) / n / 1000
    if any(status != 201 for status in statuses):
        msg = f"unexpected statuses {sorted(set(statuses))} from {app!r}"
        raise RuntimeError(msg)
    return elapsed


async def round_trips(client: redis.asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    scripts = sum(
        int(stats.get(k, {}).get("calls", 0)) for k in ("cmdstat_evalsha", "cmdstat_eval")
    )
    if scripts:  # the commands run inside the scripts are not round trips
        return scripts
    return sum(
        int(v["calls"])
        for k, v in stats.items()
        if k not in ("cmdstat_info", "cmdstat_config|resetstat")
    )


async def bench(url: str, repeat: int, quick: bool) -> Section:
    client = redis.asyncio.Redis.from_url(url)
    await client.flushall()
    apps = contenders(client)
    n = 300 if quick else 3000
    samples: dict[tuple[str, str], list[float]] = {}
    trips: dict[tuple[str, str], float] = {}
    counter = 0

    def fresh(i: int) -> bytes:
        return b"k-%d" % (counter * 1_000_000 + i)

    def same(_: int) -> bytes:
        return b"replayed-key"

    for run in range(repeat + 1):  # the first run warms up and is not counted
        for name, (app, uses_redis) in apps.items():
            for mode in ("first", "replay"):
                counter += 1
                key = fresh if mode == "first" else same
                if mode == "replay":
                    await per_request_us(app, 1, same)  # stores the response to replay
                if uses_redis:
                    await client.config_resetstat()
                us = await per_request_us(app, n, key)
                if uses_redis and run == 0:
                    trips[name, mode] = await round_trips(client) / n
                if run:
                    samples.setdefault((name, mode), []).append(us)
    await client.aclose()
    medians = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    for name, (_, uses_redis) in apps.items():
        row: list[Cell] = [name]
        for mode in ("first", "replay"):
            us = medians[name, mode]
            bare = medians["bare Starlette", mode]
            row += [us, us - bare]
        row += [f"{trips[name, 'first']:.2f} / {trips[name, 'replay']:.2f}" if uses_redis else "-"]
        rows.append(row)
    headers = [
        "app",
        "first: µs",
        "first: µs added",
        "replay: µs",
        "replay: µs added",
        "Redis round trips per request (first / replay)",
    ]
    raw = {name: {mode: samples[name, mode] for mode in ("first", "replay")} for name in apps}
    return Section(
        key="latency",
        title="Added latency per request, in process, one request at a time",
        headers=headers,
        rows=rows,
        raw=raw,
        chart=[2, 4],
    )


async def main_async(args: argparse.Namespace) -> Report:
    parts = ["# Idempotency benchmarks", ""]
    with RedisServer() as server:
        machine = Machine.probe(PACKAGES, find_redis_server())
        parts += ["## Machine", "", machine.markdown(), ""]
        section = await bench(server.url, args.repeat, args.quick)
        parts += [f"## {section.title}", ""]
        parts += [section.markdown(), ""]
    parts.append(
        f"Medians of {args.repeat} runs of {300 if args.quick else 3000} requests. Rerun: "
        f"`python dev.py bench idempotency{' --quick' if args.quick else ''} "
        f"--repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=[section])


def main(argv: list[str] | None = None) -> int:
    return run_cli("idempotency", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
