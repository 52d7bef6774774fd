from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio

from resilient import (
    BackendUnavailable,
    ConfigurationError,
    IdempotencyConflict,
    IdempotencyError,
    MemoryBackend,
    RedisBackend,
    idempotent,
)
from resilient.events import BackendFailed, IdempotencyRejected, IdempotencyReplayed
from resilient.testing import RecordingObserver, RedisServer


@dataclass
class Event:
    id: str
    cents: int


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemoryBackend()
    return request.getfixturevalue("redis_backend")


async def test_the_body_runs_once_per_key(backend: Any) -> None:
    charged: list[int] = []
    recorder = RecordingObserver()

    @idempotent("payment:{event.id}", backend=backend, observer=recorder)
    async def charge(event: Event) -> dict[str, Any]:
        charged.append(event.cents)
        return {"charged": event.cents, "refs": ("a", "b")}

    first = await charge(Event("e1", 500))
    again = await charge(Event("e1", 500))
    other = await charge(Event("e2", 700))
    assert charged == [500, 700]
    assert first == again == {"charged": 500, "refs": ["a", "b"]}  # the JSON round trip
    assert other == {"charged": 700, "refs": ["a", "b"]}
    assert len(recorder.of(IdempotencyReplayed)) == 1
    assert {e.block for e in recorder.events} == {"idempotency"}  # as the middleware's


async def test_a_duplicate_in_progress_conflicts(backend: Any) -> None:
    gate, runs = asyncio.Event(), []
    recorder = RecordingObserver()

    @idempotent(lambda event_id: f"e:{event_id}", backend=backend, observer=recorder)
    async def handle(event_id: str) -> int:
        runs.append(event_id)
        await gate.wait()
        return len(runs)

    first = asyncio.create_task(handle("x"))
    await asyncio.sleep(0.01)
    with pytest.raises(IdempotencyConflict, match="already running") as raised:
        await handle("x")
    assert raised.value.retry_after > 0
    rejected = [(e.block, e.reason) for e in recorder.of(IdempotencyRejected)]
    assert rejected == [("idempotency", "in_progress")]
    gate.set()
    assert await first == 1
    assert await handle("x") == 1
    assert runs == ["x"]


async def test_a_named_waiter_gets_the_first_result(backend: Any) -> None:
    gate, runs = asyncio.Event(), []

    @idempotent("{event_id}", backend=backend, name="consumer")
    async def first(event_id: str) -> str:
        runs.append("first")
        await gate.wait()
        return "done"

    @idempotent("{event_id}", backend=backend, name="consumer", wait=5.0)
    async def second(event_id: str) -> str:
        runs.append("second")
        return "again"

    task = asyncio.create_task(first("k"))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(second("k"))
    await asyncio.sleep(0.05)
    gate.set()
    assert await task == "done"
    assert await waiter == "done"
    assert runs == ["first"]


async def test_an_exception_releases_the_key(backend: Any) -> None:
    attempts = []

    @idempotent("{n}", backend=backend)
    async def flaky(n: int) -> int:
        attempts.append(n)
        if len(attempts) == 1:
            raise ConnectionError("downstream hiccup")
        return n * 2

    with pytest.raises(ConnectionError):
        await flaky(21)
    assert await flaky(21) == 42
    assert await flaky(21) == 42
    assert attempts == [21, 21]


async def test_a_result_json_cannot_encode_is_a_clear_error(backend: Any) -> None:
    @idempotent("{n}", backend=backend)
    async def bad(n: int) -> object:
        return {1, 2}

    with pytest.raises(IdempotencyError, match="must return JSON-serialisable data"):
        await bad(1)
    with pytest.raises(IdempotencyError, match="returned a set"):
        await bad(1)  # released, not stored: it fails the same way again


def test_sync_functions_and_bad_templates_are_refused() -> None:
    with pytest.raises(TypeError, match="async functions"):

        @idempotent("{n}")  # type: ignore[arg-type]
        def sync(n: int) -> int:
            return n

    with pytest.raises(ConfigurationError, match="does not take"):

        @idempotent("{missing}")
        async def f(n: int) -> int:
            return n


async def test_an_empty_key_is_refused() -> None:
    @idempotent(lambda n: "", backend=MemoryBackend())
    async def f(n: int) -> int:
        return n

    with pytest.raises(ConfigurationError, match="non-empty string"):
        await f(1)


async def test_redis_down_raises_backend_unavailable_or_runs_open(
    fresh_redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    runs: list[int] = []
    recorder = RecordingObserver()
    async with RedisBackend(client) as backend:

        @idempotent("{n}", backend=backend, backend_retry_after=4, observer=recorder)
        async def closed(n: int) -> int:
            runs.append(n)
            return n

        @idempotent("{n}", backend=backend, on_backend_error="open", observer=recorder)
        async def opened(n: int) -> int:
            runs.append(n)
            return n

        fresh_redis_server.stop()
        with pytest.raises(BackendUnavailable, match="was not run") as raised:
            await closed(1)
        assert raised.value.retry_after == 4
        assert await opened(2) == 2
    await client.aclose()
    assert runs == [2]
    assert [e.outcome for e in recorder.of(BackendFailed)] == ["raised", "ran unguarded"]
