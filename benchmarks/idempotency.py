"""Idempotency keys, side by side with asgi-idempotency-header, in one run.

Each contender wraps the same Starlette app (``POST /api/orders`` answering a small JSON
body) and is called in process, one request at a time, so that what is measured is the
middleware's own cost plus its store's round trips:

* ``first``: every request carries a new key (claim, run, store the response);
* ``replay``: every request repeats one key (the stored response is sent back).

A second section prices the opt-in ``replicas=`` of the Redis path: the store's
``complete`` alone, without and with ``WAIT 1`` for a replica (a second local
``redis-server`` started with ``--replicaof``), one call at a time, each on a key claimed
just before (not timed): the median and the 99th percentile of the calls' latencies.

Redis runs on a dedicated local ``redis-server``. The last column counts the commands
clients sent per request, from ``INFO commandstats``: each is one round trip here, since
no contender pipelines one request's commands. ``INFO`` also counts the commands a Lua
script runs, so for scripts only the ``EVALSHA``/``EVAL`` calls are counted. The design
promises one round trip to claim plus one to store, and one to replay.

Every figure is the median of ``--repeat`` runs; contenders alternate within each run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks._common import Cell, Machine, Report, Section, run_cli
from resilient import IdempotencyMiddleware, MemoryBackend, RedisBackend
from resilient.idempotency.redis import RedisIdempotencyStore
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
    in_memory = IdempotencyMiddleware(starlette_app(), backend=MemoryBackend())
    on_redis = IdempotencyMiddleware(starlette_app(), backend=RedisBackend(client))
    apps: dict[str, tuple[Any, bool]] = {
        "bare Starlette": (starlette_app(), False),
        "resilient, memory": (in_memory, False),
        "resilient, Redis": (on_redis, True),
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


def wait_for_sync(replica: RedisServer) -> None:
    """Return once *replica* is in sync with its master (at most 20 s)."""
    deadline = time.monotonic() + 20
    with redis.Redis.from_url(replica.url) as probe:
        while probe.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                msg = "the replica did not sync"
                raise RuntimeError(msg)
            time.sleep(0.02)


async def wait_bench(
    master: RedisServer, replica: RedisServer, repeat: int, quick: bool
) -> Section:
    """``complete`` without and with ``WAIT`` for one replica: per-call latency in µs."""
    client = redis.asyncio.Redis.from_url(master.url)
    await client.flushall()
    await asyncio.to_thread(wait_for_sync, replica)
    backend = RedisBackend(client)
    store = backend.store("idempotency", RedisIdempotencyStore)
    payload = b'{"v":1,"status":201,"headers":[]}\n' + b"x" * 200
    n = 200 if quick else 2000
    counter = 0

    async def latencies(replicas: int) -> list[float]:
        nonlocal counter
        out = []
        for _ in range(n):
            counter += 1
            key = f"bench-{counter}"
            await store.claim(key, "", "owner", 30_000, None)
            start = time.perf_counter_ns()
            stored = await store.complete(
                key, "owner", payload, 60_000, None, replicas=replicas, replica_timeout_ms=1000
            )
            out.append((time.perf_counter_ns() - start) / 1000)
            if not stored:
                msg = "complete did not store"
                raise RuntimeError(msg)
        return out

    modes = {"complete": 0, "complete + WAIT 1 replica": 1}
    medians: dict[str, list[float]] = {name: [] for name in modes}
    p99s: dict[str, list[float]] = {name: [] for name in modes}
    for run in range(repeat + 1):  # the first run warms up and is not counted
        for name, replicas in modes.items():
            calls = await latencies(replicas)
            if run:
                medians[name].append(statistics.median(calls))
                p99s[name].append(sorted(calls)[int(len(calls) * 0.99) - 1])
    await backend.aclose()
    await client.aclose()
    base = statistics.median(medians["complete"])
    rows: list[list[Cell]] = []
    for name in modes:
        median = statistics.median(medians[name])
        rows.append([name, median, statistics.median(p99s[name]), median - base])
    return Section(
        key="wait",
        title="Storing a result with and without WAIT for a replica (local replica)",
        headers=["store's complete", "median: µs", "p99: µs", "median: µs added"],
        rows=rows,
        raw={name: {"median: µs": medians[name], "p99: µs": p99s[name]} for name in modes},
        note=(
            f"Medians over {repeat} runs of {n} calls, each the median (and 99th percentile) "
            "of its calls; master and replica on this machine, so the figure is the "
            "replication round trip on loopback, the least WAIT can cost."
        ),
    )


SECTIONS = ("latency", "wait")


async def main_async(args: argparse.Namespace) -> Report:
    only = getattr(args, "only", None) or SECTIONS
    parts = ["# Idempotency benchmarks", ""]
    sections: list[Section] = []
    with RedisServer() as server:
        machine = Machine.probe(PACKAGES, find_redis_server())
        parts += ["## Machine", "", machine.markdown(), ""]
        if "latency" in only:
            section = await bench(server.url, args.repeat, args.quick)
            parts += [f"## {section.title}", "", section.markdown(), ""]
            parts.append(
                f"Medians of {args.repeat} runs of {300 if args.quick else 3000} requests."
            )
            parts.append("")
            sections.append(section)
        if "wait" in only:
            with redis.Redis.from_url(server.url) as admin:  # the replica syncs at once
                admin.config_set("repl-diskless-sync-delay", 0)
            with RedisServer(args=("--replicaof", server.host, str(server.port))) as replica:
                waits = await wait_bench(server, replica, args.repeat, args.quick)
            parts += [f"## {waits.title}", "", waits.note, "", waits.markdown(), ""]
            sections.append(waits)
    options = "".join(f" --only {name}" for name in getattr(args, "only", None) or ())
    options += " --quick" if args.quick else ""
    parts.append(f"Rerun: `python dev.py bench idempotency{options} --repeat {args.repeat}`.")
    return Report(markdown="\n".join(parts), machine=machine, sections=sections)


def main(argv: list[str] | None = None) -> int:
    return run_cli("idempotency", __doc__, main_async, argv, sections=SECTIONS)


if __name__ == "__main__":
    sys.exit(main())
