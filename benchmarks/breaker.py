"""Circuit breakers, side by side with circuitbreaker, pybreaker, aiobreaker and purgatory.

* ``success``: nanoseconds each breaker adds to a call that succeeds through a closed
  circuit (the cost every call pays), sync and async, over the same bare function. Every
  breaker keeps its default window; each is warmed up first, so ours runs in its steady
  state (a window full of successes).
* ``shared``: with state shared through Redis (a dedicated local ``redis-server``), the
  Redis commands each successful call sends (``INFO commandstats``) and its cost.

Every figure is the median of ``--repeat`` runs; contenders alternate within each run so
that drift of the machine touches them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from benchmarks._common import (
    AsyncCall,
    Cell,
    Machine,
    Report,
    Section,
    SyncCall,
    async_ns,
    kind_markdown,
    kind_sections,
    rows_against_bare,
    run_cli,
    sample_calls,
    sync_ns,
)
from resilient import CircuitBreaker

PACKAGES = ["resilient-asgi", "circuitbreaker", "pybreaker", "aiobreaker", "purgatory", "redis"]
OURS = "resilient `CircuitBreaker`"


def work() -> int:
    return 1


async def async_work() -> int:
    return 1


def sync_contenders() -> dict[str, SyncCall]:
    import circuitbreaker
    import purgatory
    import pybreaker

    calls: dict[str, SyncCall] = {
        "bare call": work,
        OURS: CircuitBreaker("bench")(work),
        "resilient, slow-call rule (times each call)": CircuitBreaker(
            "bench-slow", slow_call_duration=1.0
        )(work),
        "circuitbreaker `@circuit`": circuitbreaker.circuit(work),
        "pybreaker `CircuitBreaker()`": pybreaker.CircuitBreaker()(work),
    }
    factory: Any = purgatory.SyncCircuitBreakerFactory()
    calls["purgatory `SyncCircuitBreakerFactory` (memory)"] = factory(circuit="bench")(work)
    return calls


def async_contenders() -> dict[str, AsyncCall]:
    import aiobreaker
    import circuitbreaker
    import purgatory

    calls: dict[str, AsyncCall] = {
        "bare call": async_work,
        OURS: CircuitBreaker("bench-async")(async_work),
        "circuitbreaker `@circuit`": circuitbreaker.circuit(async_work),
        "aiobreaker `CircuitBreaker()`": aiobreaker.CircuitBreaker()(async_work),
    }
    factory: Any = purgatory.AsyncCircuitBreakerFactory()
    calls["purgatory `AsyncCircuitBreakerFactory` (memory)"] = factory(circuit="bench")(async_work)
    return calls


async def bench_success(repeat: int, quick: bool) -> list[Section]:
    n = 20_000 if quick else 300_000
    samples = await sample_calls(sync_contenders(), async_contenders(), n, repeat)
    return kind_sections(
        "success",
        "A call that succeeds through a closed circuit",
        ["breaker", "ns per call", "ns added", "added vs ours"],
        samples,
        lambda runs: rows_against_bare(runs, OURS, digits=2),
    )


async def bench_shared(url: str, repeat: int, quick: bool) -> Section:
    import purgatory
    import pybreaker
    import redis
    import redis.asyncio

    from resilient import RedisBackend

    n = 500 if quick else 5000
    sync_client = redis.Redis.from_url(url)
    async_client = redis.asyncio.Redis.from_url(url)
    backend = RedisBackend(async_client)
    ours = CircuitBreaker("bench-shared", backend=backend)(async_work)
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, sync_client)
    theirs = pybreaker.CircuitBreaker(state_storage=storage)(work)
    # purgatory's SyncRedisUnitOfWork calls the asyncio client from sync code and fails
    # with redis-py 8: its async twin is the one that works.
    factory: Any = purgatory.AsyncCircuitBreakerFactory(uow=purgatory.AsyncRedisUnitOfWork(url))
    await factory.initialize()
    purgatory_call = factory(circuit="bench")(async_work)

    def commands() -> int:
        stats = sync_client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    await ours()  # starts the sync task, which reads once
    samples: dict[str, list[float]] = {}
    per_call: dict[str, float] = {}
    for _ in range(repeat):
        before = commands()
        samples.setdefault(OURS, []).append(await async_ns(ours, n))
        per_call[OURS] = (commands() - before) / n
        name = "pybreaker `CircuitRedisStorage` (sync)"
        before = commands()
        samples.setdefault(name, []).append(sync_ns(theirs, n))
        per_call[name] = (commands() - before) / n
        name = "purgatory `AsyncRedisUnitOfWork`"
        before = commands()
        samples.setdefault(name, []).append(await async_ns(purgatory_call, n))
        per_call[name] = (commands() - before) / n
    await backend.aclose()
    await async_client.aclose()
    sync_client.close()
    out: list[list[Cell]] = [
        [name, statistics.median(values) / 1000, f"{per_call[name]:.2f}"]
        for name, values in samples.items()
    ]
    return Section(
        key="shared",
        title="State shared through Redis: a call that succeeds",
        headers=["breaker (state in Redis)", "µs per call", "Redis commands per call"],
        rows=out,
        raw={name: {"ns per call": values} for name, values in samples.items()},
        chart=[1],
    )


SECTIONS = ("success", "shared")


async def main_async(args: argparse.Namespace) -> Report:
    from resilient.testing import RedisServer, find_redis_server

    only = set(args.only or SECTIONS)
    machine = Machine.probe(PACKAGES, find_redis_server())
    sections: list[Section] = []
    parts = ["# Circuit breaker benchmarks", "", "## Machine", ""]
    parts += [machine.markdown(), ""]
    if "success" in only:
        parts += ["## A call that succeeds through a closed circuit", ""]
        sync, asynchronous = await bench_success(args.repeat, args.quick)
        sections += [sync, asynchronous]
        parts += [kind_markdown([sync, asynchronous]), ""]
    if "shared" in only:
        parts += ["## State shared through Redis: a call that succeeds", ""]
        with RedisServer() as server:
            shared = await bench_shared(server.url, args.repeat, args.quick)
        sections.append(shared)
        parts += [shared.markdown(), ""]
    parts.append(
        f"Medians of {args.repeat} runs. Rerun: `python dev.py bench breaker"
        f"{' --quick' if args.quick else ''} --repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=sections)


def main(argv: list[str] | None = None) -> int:
    return run_cli("breaker", __doc__, main_async, argv, sections=SECTIONS)


if __name__ == "__main__":
    sys.exit(main())
