"""A shared breaker across real processes: the probe goes where the traffic is.

Each process runs one instance (its own client, its own token) on a :class:`FakeClock`
that the test moves forward in every process alike, and obeys commands sent through a
queue: sync now, call, start a probe that never ends, move the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from typing import Any

import pytest
import redis.asyncio

from resilient import CircuitOpenError, RedisBackend
from resilient.breaker import CircuitBreaker
from resilient.testing import FakeClock, RedisServer

TIMEOUT = 30


class Boom(Exception):
    pass


def _instance(url: str, commands: Any, replies: Any) -> None:
    async def main() -> None:
        clock = FakeClock()
        client = redis.asyncio.Redis.from_url(url)
        async with RedisBackend(client) as backend:
            breaker = CircuitBreaker(
                "payments",
                backend=backend,
                clock=clock,
                failure_rate=0.5,
                minimum_calls=2,
                window=2,
                open_for=10.0,
                sync_interval=60.0,  # the test syncs by hand; a lease lasts 180 s
            )
            shared = breaker.shared_store
            assert shared is not None
            hang = asyncio.Event()
            held: set[asyncio.Task[Any]] = set()

            async def ok() -> str:
                return "ok"

            async def fail() -> None:
                raise Boom

            async def slow() -> None:
                replies.put("probing")
                await hang.wait()

            loop = asyncio.get_running_loop()
            while True:
                command, *args = await loop.run_in_executor(None, commands.get)
                if command == "exit":
                    break
                if command == "advance":
                    clock.advance(args[0])
                    reply = "advanced"
                elif command == "sync":
                    await shared.sync_now()
                    reply = breaker.state.value
                elif command == "hold":
                    held.add(loop.create_task(breaker.call(slow)))
                    continue  # slow() replies once the probe is in flight
                else:
                    try:
                        await breaker.call(fail if command == "fail" else ok)
                        reply = "admitted"
                    except CircuitOpenError:
                        reply = "rejected"
                    except Boom:
                        reply = "failed"
                replies.put(reply)
            for task in held:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await client.aclose()

    asyncio.run(main())


class Instances:
    def __init__(self, url: str, n: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.commands = [context.Queue() for _ in range(n)]
        self.replies = [context.Queue() for _ in range(n)]
        self.processes = [
            context.Process(target=_instance, args=(url, c, r))
            for c, r in zip(self.commands, self.replies, strict=True)
        ]
        for process in self.processes:
            process.start()
        self.alive = set(range(n))

    def send(self, i: int, *command: Any) -> str:
        self.commands[i].put(command)
        reply: str = self.replies[i].get(timeout=TIMEOUT)
        return reply

    def advance(self, seconds: float) -> None:
        for i in sorted(self.alive):
            assert self.send(i, "advance", seconds) == "advanced"

    def kill(self, i: int) -> None:
        pid = self.processes[i].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self.processes[i].join(timeout=TIMEOUT)
        self.alive.discard(i)

    def close(self) -> None:
        for i in sorted(self.alive):
            self.commands[i].put(("exit",))
        for i, process in enumerate(self.processes):
            process.join(timeout=TIMEOUT)
            if i in self.alive:
                assert process.exitcode == 0
            else:
                process.kill()


@pytest.mark.slow
def test_processes_recover_where_the_traffic_is_and_past_a_prober_killed(
    redis_server: RedisServer,
) -> None:
    if not redis_server.is_running:
        redis_server.start()
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_server.url).flushall()
    a, b, c = 0, 1, 2
    instances = Instances(redis_server.url, 3)
    try:
        # The dependency fails on a; every instance learns the circuit is open.
        assert [instances.send(a, "fail") for _ in range(2)] == ["failed", "failed"]
        assert [instances.send(i, "sync") for i in (a, b, c)] == ["open"] * 3
        # The open period ends and the dependency is back. a syncs first and often,
        # but the traffic reaches only b and c.
        instances.advance(10)
        for _ in range(3):
            instances.send(a, "sync")
        assert instances.send(b, "call") == "admitted"  # b claims the lease and probes
        assert instances.send(b, "sync") == "closed"  # b's close is published
        assert instances.send(c, "sync") == "closed"
        assert instances.send(c, "call") == "admitted"

        # Down again, opened by b; after the open period, c probes and is killed (-9)
        # while its probe is in flight.
        assert [instances.send(b, "fail") for _ in range(2)] == ["failed", "failed"]
        assert [instances.send(i, "sync") for i in (b, a, c)] == ["open"] * 3  # b publishes
        instances.advance(10)
        instances.commands[c].put(("hold",))
        assert instances.replies[c].get(timeout=TIMEOUT) == "probing"
        instances.kill(c)
        assert instances.send(a, "call") == "rejected"  # c's lease is still running
        instances.advance(180)  # c's lease (three of its sync intervals) runs out
        assert instances.send(a, "sync") == "half_open"  # open, and the lease is free
        assert instances.send(a, "call") == "admitted"
        assert instances.send(a, "sync") == "closed"
        assert instances.send(b, "sync") == "closed"
        assert instances.send(b, "call") == "admitted"
    finally:
        instances.close()
