"""Cache stampedes, side by side with cashews and aiocache, in one run.

Sections:

* ``stampede``: 1,000 concurrent requests for one cold key in one process, on a dedicated
  local ``redis-server``, with a 50 ms loader: loader calls, latency p50/p99 of the
  requests, and the commands Redis executed (``INFO commandstats``, which also counts the
  commands run inside Lua scripts, for every contender alike);
* ``hit``: microseconds per read of a warm key, one at a time;
* ``tags``: ours alone, on the same server: a warm read of a value with tags (its tags'
  versions checked in the same script), and the invalidation of one tag that 1,000 values
  carry (one script, whatever the number of values).

Every figure is the median of ``--repeat`` runs; contenders alternate within each run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio

from benchmarks._common import Cell, Machine, Report, Section, percentile, run_cli
from resilient import Cache, MemoryBackend, RedisBackend
from resilient.testing import RedisServer, find_redis_server

PACKAGES = ["resilient-asgi", "cashews", "aiocache", "redis"]
LOAD_S = 0.05
REQUESTS = 1000

Lookup = Callable[[int], Awaitable[object]]


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    async def load(self, key: int) -> dict[str, int]:
        self.calls += 1
        await asyncio.sleep(LOAD_S)  # the database query
        return {"product": key}


async def contenders(url: str, counter: Counter) -> dict[str, tuple[Lookup, bool]]:
    """Name -> (lookup of a key, uses Redis)."""
    import aiocache
    from cashews import Cache as CashewsCache

    client = redis.asyncio.Redis.from_url(url)
    ours = Cache(RedisBackend(client), ttl=600)
    in_memory = Cache(MemoryBackend(), ttl=600)

    async def resilient_redis(key: int) -> object:
        return await ours.get_or_load(f"p:{key}", lambda: counter.load(key))

    async def resilient_memory(key: int) -> object:
        return await in_memory.get_or_load(f"p:{key}", lambda: counter.load(key))

    async def load(key: int) -> object:
        return await counter.load(key)

    # The peers' decorators are applied as calls: their types differ between installs.
    cashews_lock = CashewsCache()
    cashews_lock.setup(url)
    cashews_lock_true: Lookup = cashews_lock(ttl="10m", lock=True)(load)

    cashews_locked = CashewsCache()
    cashews_locked.setup(url)
    cashews_locked_fn: Lookup = cashews_locked(ttl="10m")(cashews_locked.locked(ttl="10s")(load))

    cashews_early = CashewsCache()
    cashews_early.setup(url)
    cashews_early_fn: Lookup = cashews_early.early(ttl="10m", early_ttl="5m")(load)

    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    # A blocking pool: with its default pool, 1,000 concurrent misses exhaust the
    # connections (MaxConnectionsError) instead of queueing.
    aiocache_stampede: Lookup = aiocache.cached_stampede(
        lease=2,
        ttl=600,
        cache=aiocache.Cache.REDIS,
        endpoint=host,
        port=int(port),
        pool_max_size=64,
        connection_pool_class=redis.asyncio.BlockingConnectionPool,
    )(load)

    return {
        "resilient `Cache` (Redis)": (resilient_redis, True),
        "resilient `Cache` (memory: single flight alone)": (resilient_memory, False),
        "cashews `@cache(lock=True)`": (cashews_lock_true, True),
        "cashews `@cache` + `@cache.locked`": (cashews_locked_fn, True),
        "cashews `@cache.early`": (cashews_early_fn, True),
        "aiocache `cached_stampede`": (aiocache_stampede, True),
    }


def commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def stampede(lookup: Lookup, key: int) -> list[float]:
    async def one() -> float:
        start = time.perf_counter()
        await lookup(key)
        return (time.perf_counter() - start) * 1000

    return list(await asyncio.gather(*(one() for _ in range(REQUESTS))))


STAMPEDE_HEADERS = ["contender", "loader calls", "p50 ms", "p99 ms", "Redis commands"]


def stampede_raw(
    loads: list[int], p50: list[float], p99: list[float], cmds: list[int]
) -> dict[str, list[float]]:
    return {
        "loader calls": [float(n) for n in loads],
        "p50 ms": p50,
        "p99 ms": p99,
        "Redis commands": [float(n) for n in cmds],
    }


async def bench(url: str, repeat: int) -> tuple[Section, Section]:
    counter = Counter()
    apps = await contenders(url, counter)
    sync = redis.Redis.from_url(url)
    loads: dict[str, list[int]] = {name: [] for name in apps}
    p50: dict[str, list[float]] = {name: [] for name in apps}
    p99: dict[str, list[float]] = {name: [] for name in apps}
    cmds: dict[str, list[int]] = {name: [] for name in apps}
    hits: dict[str, list[float]] = {name: [] for name in apps}
    key = 0
    for _ in range(repeat):
        for name, (lookup, _uses_redis) in apps.items():
            key += 1
            counter.calls = 0
            before = commands(sync)
            latencies = await stampede(lookup, key)
            cmds[name].append(commands(sync) - before)
            loads[name].append(counter.calls)
            p50[name].append(percentile(latencies, 0.5))
            p99[name].append(percentile(latencies, 0.99))
            start = time.perf_counter()
            for _ in range(200):
                await lookup(key)
            hits[name].append((time.perf_counter() - start) / 200 * 1e6)
    sync.close()
    rows: list[list[Cell]] = [
        [
            name,
            f"{statistics.median(loads[name]):.0f}",
            statistics.median(p50[name]),
            statistics.median(p99[name]),
            f"{statistics.median(cmds[name]):,.0f}" if uses_redis else "-",
        ]
        for name, (_, uses_redis) in apps.items()
    ]
    stampede_section = Section(
        key="stampede",
        title=f"Stampede: {REQUESTS:,} concurrent requests for one cold key, "
        f"{LOAD_S * 1000:.0f} ms loader, one process",
        headers=STAMPEDE_HEADERS,
        rows=rows,
        raw={name: stampede_raw(loads[name], p50[name], p99[name], cmds[name]) for name in apps},
        chart=[3],
    )
    hit_section = Section(
        key="hit",
        title="Warm reads",
        headers=["contender", "µs per warm read"],
        rows=[[name, statistics.median(hits[name])] for name in apps],
        raw={name: {"µs per warm read": hits[name]} for name in apps},
        chart=[1],
    )
    return stampede_section, hit_section


async def bench_tags(url: str, repeat: int) -> Section:
    """Warm reads with and without tags, and invalidating a tag of 1,000 values."""
    client = redis.asyncio.Redis.from_url(url)
    sync = redis.Redis.from_url(url)
    tags = ["catalog", "product:42"]
    reads = 2_000

    async def value() -> dict[str, int]:
        return {"product": 42}

    def scripts() -> int:
        return int(sync.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    names = ["warm read, no tags", "warm read, 2 tags", "invalidate a tag of 1,000 values"]
    micros: dict[str, list[float]] = {name: [] for name in names}
    trips: dict[str, list[float]] = {name: [] for name in names}
    cmds: dict[str, list[float]] = {name: [] for name in names}
    async with RedisBackend(client) as backend:
        cache = Cache(backend, ttl=600)
        for run in range(repeat):
            await cache.get_or_load(f"plain:{run}", value)
            await cache.get_or_load(f"tagged:{run}", value, tags=tags)
            for name, key, key_tags in (
                (names[0], f"plain:{run}", []),
                (names[1], f"tagged:{run}", tags),
            ):
                before, evals = commands(sync), scripts()
                start = time.perf_counter()
                for _ in range(reads):
                    await cache.get_or_load(key, value, tags=key_tags)
                micros[name].append((time.perf_counter() - start) / reads * 1e6)
                trips[name].append((scripts() - evals) / reads)
                cmds[name].append((commands(sync) - before) / reads)
            for i in range(1_000):
                await cache.set(f"page:{run}:{i}", i, tags=[f"pages:{run}"])
            before, evals = commands(sync), scripts()
            start = time.perf_counter()
            await cache.invalidate_tags([f"pages:{run}"])
            micros[names[2]].append((time.perf_counter() - start) * 1e6)
            trips[names[2]].append(scripts() - evals)
            cmds[names[2]].append(commands(sync) - before)
    await client.aclose()
    sync.close()
    rows: list[list[Cell]] = [
        [
            f"resilient `Cache` (Redis): {name}",
            statistics.median(micros[name]),
            f"{statistics.median(trips[name]):.0f}",
            f"{statistics.median(cmds[name]):,.0f}",
        ]
        for name in names
    ]
    return Section(
        key="tags",
        title="Tags: warm reads and an invalidation",
        headers=["operation", "µs", "round trips", "Redis commands"],
        rows=rows,
        raw={
            name: {"µs": micros[name], "round trips": trips[name], "Redis commands": cmds[name]}
            for name in names
        },
    )


def _process(url: str, key: str, start: Any, out: Any) -> None:
    """One of the 4 processes: 250 concurrent requests for the key, once released."""

    async def main() -> list[float]:
        client = redis.asyncio.Redis.from_url(url)
        async with RedisBackend(client) as backend:
            cache = Cache(backend, ttl=600)

            async def load() -> dict[str, str]:
                await client.incr(f"bench:loads:{key}")
                await asyncio.sleep(LOAD_S)
                return {"product": key}

            await client.ping()
            start.wait()

            async def one() -> float:
                begun = time.perf_counter()
                await cache.get_or_load(key, load)
                return (time.perf_counter() - begun) * 1000

            latencies = list(await asyncio.gather(*(one() for _ in range(REQUESTS // 4))))
        await client.aclose()
        return latencies

    out.put(asyncio.run(main()))


def bench_processes(url: str, repeat: int) -> Section:
    """1,000 requests for one cold key over 4 processes released together."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    sync = redis.Redis.from_url(url)
    loads, p50s, p99s, cmds = [], [], [], []
    for run in range(repeat):
        key = f"product:multi:{run}"
        start, out = context.Event(), context.Queue()
        workers = [context.Process(target=_process, args=(url, key, start, out)) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)  # let every process connect before the release
        before = commands(sync)
        start.set()
        latencies = [ms for _ in workers for ms in out.get(timeout=60)]
        for worker in workers:
            worker.join(timeout=30)
        cmds.append(commands(sync) - before)
        loads.append(int(sync.get(f"bench:loads:{key}") or 0))
        p50s.append(percentile(latencies, 0.5))
        p99s.append(percentile(latencies, 0.99))
    sync.close()
    name = "resilient `Cache` (Redis), 4 processes x 250"
    row: list[Cell] = [
        name,
        f"{statistics.median(loads):.0f}",
        statistics.median(p50s),
        statistics.median(p99s),
        f"{statistics.median(cmds):,.0f}",
    ]
    return Section(
        key="processes",
        title=f"The same {REQUESTS:,} requests spread over 4 processes",
        headers=STAMPEDE_HEADERS,
        rows=[row],
        raw={name: stampede_raw(loads, p50s, p99s, cmds)},
    )


async def main_async(args: argparse.Namespace) -> Report:
    if args.quick:
        args.repeat = 1
    parts = ["# Cache benchmarks", "", "## Machine", ""]
    with RedisServer() as server:
        machine = Machine.probe(PACKAGES, find_redis_server())
        parts += [machine.markdown(), ""]
        stampede, hit = await bench(server.url, args.repeat)
        processes = bench_processes(server.url, args.repeat)
        tags = await bench_tags(server.url, args.repeat)
    parts += [
        f"## {stampede.title}",
        "",
        stampede.markdown(),
        "",
        f"## {processes.title}",
        "",
        "Each process connects first; then all are released together. Redis commands "
        "include the loader's own counter (`INCR`), one per load.",
        "",
        processes.markdown(),
        "",
        f"## {hit.title}",
        "",
        hit.markdown(),
        "",
        f"## {tags.title}",
        "",
        "Ours alone, on the same server: reads of a value without tags and with two (their "
        "versions are checked in the read's own script), and `invalidate_tags` of a tag "
        "that 1,000 values carry. Redis commands include those run inside the scripts.",
        "",
        tags.markdown(),
        "",
        f"Medians of {args.repeat} runs. "
        f"Rerun: `python dev.py bench cache --repeat {args.repeat}`.",
    ]
    sections = [stampede, processes, hit, tags]
    return Report(markdown="\n".join(parts), machine=machine, sections=sections)


def main(argv: list[str] | None = None) -> int:
    return run_cli("cache", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
