"""The Redis backend's channel, next to redis-py's own calls and the public-API route.

One section per concurrency (1 and 64), against a dedicated local redis-server; every
contender runs ``ratelimit.lua`` (a TokenBucket check) but the ceiling:

* ``redis-py EVALSHA `return 1` (ceiling)``: redis-py's own per-call cost, on the
  client's pool (the ceiling of the rate-limit benchmark);
* ``redis-py EVALSHA ratelimit.lua``: the script a TokenBucket hit runs, sent by the
  client itself, the bare call resilient must not be slower than;
* ``public route: dedicated client, no retry``: the same call through redis-py's client
  API (``evalsha``) on a client of its own, made with the user's client's connection
  settings (its pool's connection class, which no public accessor gives), no retry
  (``Retry(NoBackoff(), 0)``) and no socket timeout, its pool checking each connection
  before use: what the backend could use instead of its fenced channel;
* ``RedisBackend.run_script``: the backend's own channel, one call at a time;
* ``TokenBucket on the public route``: a RateLimiter whose store sends on that dedicated
  client, coalescing as the backend does;
* ``TokenBucket (RateLimiter on RedisBackend)``: what users run.

Every figure is the median of ``--repeat`` runs; contenders alternate within each run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from benchmarks._common import Cell, Machine, Report, Run, Section, measure, median_run, run_cli
from resilient import RateLimiter, RedisBackend, TokenBucket
from resilient.backends.redis import Script
from resilient.ratelimit.redis import RedisRateLimitStore
from resilient.testing import RedisServer, find_redis_server

PACKAGES = ["resilient-asgi", "redis", "hiredis"]
BIG = "1000000000/minute"  # nothing is denied: what is measured is the cost of a check
SCRIPT = Script("resilient.ratelimit.lua", "ratelimit.lua")
CEILING = "redis-py EVALSHA `return 1` (ceiling)"
BARE = "redis-py EVALSHA ratelimit.lua"
OURS = "TokenBucket (RateLimiter on RedisBackend)"
PUBLIC = "TokenBucket on the public route"

Op = Callable[[], Awaitable[object]]


class PublicRoute:
    """Enough of a backend for the rate-limit store, sending on a dedicated client."""

    def __init__(self, client: redis.asyncio.Redis, model: RedisBackend) -> None:
        settings: dict[str, Any] = client.get_connection_kwargs()  # type: ignore[no-untyped-call]
        pool = redis.asyncio.ConnectionPool(
            connection_class=client.connection_pool.connection_class,
            **{**settings, "socket_timeout": None, "retry": Retry(NoBackoff(), 0)},
        )
        self.dedicated = redis.asyncio.Redis(connection_pool=pool)
        self.client = client
        self.max_batch = model.max_batch
        self.key = model.key
        self.slot = model.slot
        self.guard = model.guard

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> Any:
        try:
            return await self.dedicated.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.dedicated.eval(script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        await self.dedicated.aclose()
        await self.dedicated.connection_pool.disconnect()


async def contenders(url: str, stack: list[Callable[[], Awaitable[None]]]) -> dict[str, Op]:
    client = redis.asyncio.Redis.from_url(url, max_connections=256)
    stack.append(client.aclose)
    sha = await client.script_load("return 1")
    backend = RedisBackend(client)
    stack.append(backend.aclose)
    public = PublicRoute(client, backend)
    stack.append(public.aclose)
    limiter = RateLimiter(backend)
    public_limiter = RateLimiter(RedisRateLimitStore(public))  # type: ignore[arg-type]
    bucket = TokenBucket(BIG)
    await client.script_load(SCRIPT.source)
    spec = (bucket.kind, bucket.limit, bucket.capacity, bucket.period_ms, bucket.block_ms)
    arg = "r,1,1,1," + ",".join(map(str, spec))  # as RedisRateLimitStore sends one check
    keys = iter(range(10**12))

    def key() -> str:  # 64 keys in turn per contender: no hot spot
        return f"user:{next(keys) % 64}"

    def script_keys() -> list[str]:
        return [backend.key("rl", key(), bucket.id)]

    return {
        CEILING: lambda: client.evalsha(sha, 0),
        BARE: lambda: client.evalsha(SCRIPT.sha, 1, *script_keys(), arg),
        "public route: dedicated client, no retry": lambda: public.run_script(
            SCRIPT, script_keys(), (arg,)
        ),
        "RedisBackend.run_script": lambda: backend.run_script(SCRIPT, script_keys(), (arg,)),
        PUBLIC: lambda: public_limiter.hit(key(), bucket),
        OURS: lambda: limiter.hit(key(), bucket),
    }


async def bench(url: str, repeat: int, quick: bool) -> list[Section]:
    stack: list[Callable[[], Awaitable[None]]] = []
    sections = []
    try:
        ops = await contenders(url, stack)
        for concurrency, per_worker in ((1, 300 if quick else 3000), (64, 10 if quick else 100)):
            runs: dict[str, list[Run]] = {name: [] for name in ops}
            for op in ops.values():  # warm up: connections, scripts, caches
                await measure(op, concurrency=concurrency, per_worker=max(1, per_worker // 10))
            for _ in range(repeat):
                for name, op in ops.items():
                    runs[name].append(
                        await measure(op, concurrency=concurrency, per_worker=per_worker)
                    )
            medians = {name: median_run(r) for name, r in runs.items()}
            ceiling = medians[CEILING].per_second
            bare = medians[BARE]
            rows: list[list[Cell]] = [
                [
                    name,
                    m.per_second,
                    f"{m.per_second / ceiling:.2f}x",
                    m.p50_us,
                    m.p99_us,
                    f"{m.p50_us - bare.p50_us:+.0f}",
                ]
                for name, m in medians.items()
            ]
            sections.append(
                Section(
                    key=f"c{concurrency}",
                    title=f"Script calls at concurrency {concurrency}",
                    headers=[
                        "contender",
                        "calls/s",
                        "vs ceiling",
                        "p50 µs",
                        "p99 µs",
                        "p50 vs bare EVALSHA, µs",
                    ],
                    rows=rows,
                    raw={
                        name: {
                            "calls/s": [r.per_second for r in rs],
                            "p50 µs": [r.p50_us for r in rs],
                            "p99 µs": [r.p99_us for r in rs],
                        }
                        for name, rs in runs.items()
                    },
                    chart=[1],
                )
            )
    finally:
        for close in reversed(stack):
            await close()
    return sections


async def main_async(args: argparse.Namespace) -> Report:
    parts = ["# Redis backend benchmarks", ""]
    with RedisServer() as server:
        machine = Machine.probe(PACKAGES, find_redis_server())
        parts += ["## Machine", "", machine.markdown(), ""]
        sections = await bench(server.url, args.repeat, args.quick)
    for section in sections:
        parts += [f"## {section.title}", "", section.markdown(), ""]
    per_worker = "300 / 10" if args.quick else "3000 / 100"
    parts.append(
        f"Medians of {args.repeat} runs of {per_worker} calls per worker (concurrency 1 / 64)."
    )
    options = " --quick" if args.quick else ""
    parts.append(f"Rerun: `python dev.py bench backend{options} --repeat {args.repeat}`.")
    return Report(markdown="\n".join(parts), machine=machine, sections=sections)


def main(argv: list[str] | None = None) -> int:
    return run_cli("backend", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
