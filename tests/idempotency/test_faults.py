"""Redis faults under a real uvicorn server: write stalls, restarts empty, replicas.

Each test starts its own redis-server, and stalls it for real (``CLIENT PAUSE ... WRITE``)
or kills it (``kill -9``): the point is what a client of a real server sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from resilient import (
    BackendUnavailable,
    ConfigurationError,
    IdempotencyMiddleware,
    MemoryBackend,
    RedisBackend,
    idempotent,
)
from resilient.errors import ResultNotStored
from resilient.events import BackendDataLost, BackendFailed, IdempotencyNotStored
from resilient.idempotency.keeper import store_for
from resilient.testing import FakeClock, RedisServer
from tests.idempotency.conftest import Recorder, Shop, client_for

KEY = {"Idempotency-Key": "pay-1"}


class Payments:
    """A payment route that stalls Redis writes for *pause_ms* just before it answers.

    Its Redis client and backend are made with the example shop's settings (a stalled
    Redis reaches the block's policy in 0.5 s) and closed on the server's own loop.
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.runs = 0
        self.pause_ms = 0
        self.client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
        self.backend = RedisBackend(self.client)
        self.app = Starlette(
            routes=[
                Route("/pay", self.pay, methods=["POST"]),
                Route("/pay-stream", self.pay_stream, methods=["POST"]),
            ],
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.backend.aclose()
        await self.client.aclose()

    def _charge(self) -> int:
        self.runs += 1
        if self.pause_ms:
            with redis.Redis.from_url(self.redis_url) as admin:
                admin.execute_command("CLIENT", "PAUSE", self.pause_ms, "WRITE")
        return self.runs

    async def pay(self, request: Request) -> Response:
        await request.body()
        return JSONResponse({"payment": self._charge()}, status_code=201)

    async def pay_stream(self, request: Request) -> Response:
        await request.body()
        n = self._charge()

        async def chunks() -> Any:
            yield b'{"payment": '
            yield str(n).encode() + b"}"

        return StreamingResponse(chunks(), status_code=201, media_type="application/json")


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve *app* with uvicorn in a thread on a free loopback port; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # a real server starting up: nothing to fake here
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def unpause(server: RedisServer) -> None:
    with redis.Redis.from_url(server.url) as admin:
        admin.execute_command("CLIENT", "UNPAUSE")


def shop_client(server: RedisServer) -> redis.asyncio.Redis:
    # The example shop's settings: a stalled Redis reaches the block's policy in 0.5 s.
    return redis.asyncio.Redis.from_url(server.url, socket_timeout=0.5)


def test_a_write_stall_shorter_than_the_lease_runs_the_payment_once(
    fresh_redis_server: RedisServer,
) -> None:
    payments, recorder = Payments(fresh_redis_server.url), Recorder()
    app = IdempotencyMiddleware(payments.app, payments.backend, lease=5.0, observer=recorder)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        payments.pause_ms = 1500
        first = http.post("/pay", json={"cents": 500}, headers=KEY)
        payments.pause_ms = 0
        again = http.post("/pay", json={"cents": 500}, headers=KEY)
    assert first.status_code == 201
    assert "idempotency-stored" not in first.headers
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert payments.runs == 1
    assert recorder.of(IdempotencyNotStored) == []


@pytest.mark.parametrize("path", ["/pay", "/pay-stream"])
def test_a_write_stall_past_the_lease_never_answers_success(
    fresh_redis_server: RedisServer, path: str
) -> None:
    payments, recorder = Payments(fresh_redis_server.url), Recorder()
    app = IdempotencyMiddleware(
        payments.app, payments.backend, lease=1.0, backend_retry_after=3, observer=recorder
    )
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        payments.pause_ms = 2500
        try:
            # With a content-length (/pay) or streamed: nothing went out before the store.
            response = http.post(path, json={"cents": 500}, headers=KEY)
        finally:
            unpause(fresh_redis_server)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.headers["idempotency-stored"] == "false"
    assert response.headers["content-type"] == "application/problem+json"
    assert payments.runs == 1
    assert [e.outcome for e in recorder.of(IdempotencyNotStored)] == ["answered 503"]


async def test_the_decorator_retries_complete_through_a_short_stall(
    fresh_redis_server: RedisServer,
) -> None:
    charged: list[int] = []
    client = shop_client(fresh_redis_server)
    async with RedisBackend(client) as backend:

        @idempotent("pay:{n}", backend=backend, lease=5.0)
        async def charge(n: int) -> int:
            charged.append(n)
            with redis.Redis.from_url(fresh_redis_server.url) as admin:
                admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
            return n

        assert await charge(1) == 1
        assert await charge(1) == 1  # replayed: stored once the stall ended
    await client.aclose()
    assert charged == [1]


async def test_the_decorator_raises_when_the_result_cannot_be_stored(
    fresh_redis_server: RedisServer,
) -> None:
    charged: list[int] = []
    recorder = Recorder()
    client = shop_client(fresh_redis_server)
    async with RedisBackend(client) as backend:

        @idempotent("pay:{n}", backend=backend, lease=1.0, observer=recorder)
        async def charge(n: int) -> int:
            charged.append(n)
            with redis.Redis.from_url(fresh_redis_server.url) as admin:
                admin.execute_command("CLIENT", "PAUSE", 2500, "WRITE")
            return n

        try:
            with pytest.raises(ResultNotStored, match="could not be stored") as raised:
                await charge(1)
        finally:
            unpause(fresh_redis_server)
    await client.aclose()
    assert raised.value.retry_after > 0
    assert charged == [1]
    assert [e.outcome for e in recorder.of(IdempotencyNotStored)] == ["raised"]


# -- Redis restarted empty ----------------------------------------------------------------


async def kill_and_restart_empty(server: RedisServer) -> None:
    """``kill -9`` the server, then start it again on its port: no data survives.

    In a thread, so the event loop goes on meanwhile, as a service's does: it sees its
    connections close, and the backend replaces them before its next call.
    """

    def crash_and_start() -> None:
        with redis.Redis.from_url(server.url) as admin:
            pid = int(admin.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        server.stop()  # reaps the killed process
        server.start()

    await asyncio.to_thread(crash_and_start)


async def test_a_restart_empty_is_noticed_by_every_instance(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    one = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    other = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    recorder = Recorder()
    async with RedisBackend(one) as backend_one, RedisBackend(other) as backend_other:
        apps = [
            IdempotencyMiddleware(shop.app, backend, observer=recorder)
            for backend in (backend_one, backend_other)
        ]
        async with client_for(apps[0]) as first, client_for(apps[1]) as second:
            paid = await first.post("/api/orders", json={"n": 1}, headers=KEY)
            await second.post("/api/orders", json={"n": 2}, headers={"Idempotency-Key": "k2"})
            assert recorder.of(BackendDataLost) == []  # a first sight is no loss
            await kill_and_restart_empty(fresh_redis_server)
            again = await first.post("/api/orders", json={"n": 1}, headers=KEY)
            await second.post("/api/orders", json={"n": 3}, headers={"Idempotency-Key": "k3"})
            later = await first.post(
                "/api/orders", json={"n": 4}, headers={"Idempotency-Key": "k4"}
            )
    await one.aclose()
    await other.aclose()
    assert paid.status_code == again.status_code == later.status_code == 201
    # No quarantine (the default): the lost key ran again, and both instances said so, once.
    assert "idempotent-replayed" not in again.headers
    assert shop.runs == {"orders": 5}
    lost = recorder.of(BackendDataLost)
    assert [(e.block, e.quarantine) for e in lost] == [("idempotency", 0.0)] * 2


async def test_a_quarantine_refuses_new_claims_after_a_restart_empty(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    clock, recorder = FakeClock(), Recorder()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        app = IdempotencyMiddleware(
            shop.app, backend, quarantine=30.0, clock=clock, observer=recorder
        )
        async with client_for(app) as http:
            await http.post("/api/orders", json={"n": 1}, headers=KEY)
            assert app.quarantine_left == 0.0
            await kill_and_restart_empty(fresh_redis_server)
            noticed = await http.post(
                "/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"}
            )
            clock.advance(10)
            refused = await http.post("/api/orders", json={"n": 1}, headers=KEY)
            left = app.quarantine_left
            unkeyed = await http.post("/api/orders", json={"n": 3})
            clock.advance(21)
            after = await http.post("/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"})
    await client.aclose()
    for response, retry_after in ((noticed, "30"), (refused, "20")):
        assert response.status_code == 503
        assert response.headers["retry-after"] == retry_after
        assert response.headers["content-type"] == "application/problem+json"
        assert "lost" in response.json()["detail"]
    assert left == 20.0
    assert unkeyed.status_code == 201  # nothing to guard
    assert after.status_code == 201  # the quarantine is over: "b" runs (once)
    assert app.quarantine_left == 0.0
    assert shop.runs == {"orders": 3}
    assert [e.quarantine for e in recorder.of(BackendDataLost)] == [30.0]


async def test_a_restart_that_kept_its_data_is_no_loss(shop: Shop) -> None:
    recorder = Recorder()
    with RedisServer(args=("--appendonly", "yes", "--appendfsync", "always")) as server:
        client = redis.asyncio.Redis.from_url(server.url, socket_timeout=1)
        async with RedisBackend(client) as backend:
            app = IdempotencyMiddleware(shop.app, backend, quarantine=30.0, observer=recorder)
            async with client_for(app) as http:
                first = await http.post("/api/orders", json={"n": 1}, headers=KEY)
                await kill_and_restart_empty(server)  # kill -9: the append-only file keeps the data
                again = await http.post("/api/orders", json={"n": 1}, headers=KEY)
        await client.aclose()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert shop.runs == {"orders": 1}
    assert recorder.of(BackendDataLost) == []


async def test_the_decorator_notices_a_restart_empty_and_can_quarantine(
    fresh_redis_server: RedisServer,
) -> None:
    clock, recorder, runs = FakeClock(), Recorder(), []
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:

        @idempotent("{n}", backend=backend, quarantine=5.0, clock=clock, observer=recorder)
        async def charge(n: int) -> int:
            runs.append(n)
            return n

        await charge(1)
        await kill_and_restart_empty(fresh_redis_server)
        with pytest.raises(BackendUnavailable, match="lost its records") as raised:
            await charge(2)
        assert raised.value.retry_after == 5.0
        clock.advance(5)
        assert await charge(2) == 2
    await client.aclose()
    assert runs == [1, 2]
    assert [(e.block, e.quarantine) for e in recorder.of(BackendDataLost)] == [("idempotent", 5.0)]


async def test_the_store_keeps_when_it_noticed_a_loss(redis_backend: RedisBackend) -> None:
    memory = store_for(MemoryBackend())
    store = store_for(redis_backend)
    assert store_for(redis_backend) is store  # one store per backend, whoever asks
    assert memory.data_lost_at is None
    first = await store.claim("a", "f", "o1", 1000, 1_000)
    assert (first.data_lost, store.data_lost_at) == (False, None)  # a first sight: no loss
    await redis_backend.client.flushall()
    noticed = await store.claim("b", "f", "o2", 1000, 5_000)
    after = await store.claim("c", "f", "o3", 1000, 9_000)
    assert (noticed.data_lost, after.data_lost) == (True, False)  # noticed once
    assert store.data_lost_at == 5.0  # the noticing claim's clock, in seconds
    await redis_backend.client.flushall()
    before = time.time()
    await store.claim("d", "f", "o4", 1000, None)  # the system's clock
    assert store.data_lost_at is not None
    assert before <= store.data_lost_at <= time.time()


async def test_a_loss_noticed_once_quarantines_every_guard_on_the_backend(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    # Two middleware instances and a decorator on one RedisBackend share one store: the
    # first claim after the restart notices the loss for all of them, and each applies its
    # own quarantine from that moment, whether or not it claims anything meanwhile.
    clock, recorder, runs = FakeClock(), Recorder(), []
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        first = IdempotencyMiddleware(
            shop.app, backend, quarantine=30.0, clock=clock, observer=recorder
        )
        second = IdempotencyMiddleware(
            shop.app, backend, quarantine=20.0, clock=clock, observer=recorder
        )

        @idempotent("{n}", backend=backend, quarantine=5.0, clock=clock, observer=recorder)
        async def charge(n: int) -> int:
            runs.append(n)
            return n

        async with client_for(first) as one, client_for(second) as two:
            await one.post("/api/orders", json={"n": 1}, headers=KEY)
            await charge(1)
            await kill_and_restart_empty(fresh_redis_server)
            noticed = await one.post("/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"})
            lefts = [first.quarantine_left, second.quarantine_left]
            with pytest.raises(BackendUnavailable, match="lost its records") as raised:
                await charge(2)
            refused = await two.post("/api/orders", json={"n": 3}, headers={"Idempotency-Key": "c"})
            clock.advance(5)
            charged = await charge(2)  # the decorator's own 5 s are over
            clock.advance(15)
            later = [first.quarantine_left, second.quarantine_left]
            ran = await two.post("/api/orders", json={"n": 3}, headers={"Idempotency-Key": "c"})
            still = await one.post("/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"})
    await client.aclose()
    assert noticed.status_code == refused.status_code == still.status_code == 503
    assert (noticed.headers["retry-after"], refused.headers["retry-after"]) == ("30", "20")
    assert still.headers["retry-after"] == "10"
    assert lefts == [30.0, 20.0]
    assert raised.value.retry_after == 5.0
    assert charged == 2
    assert later == [10.0, 0.0]
    assert ran.status_code == 201
    assert runs == [1, 2]
    assert shop.runs == {"orders": 2}
    # One loss of one store: one event, from the guard whose claim noticed it.
    lost = recorder.of(BackendDataLost)
    assert [(e.block, e.quarantine) for e in lost] == [("idempotency", 30.0)]


async def test_a_loss_the_decorator_noticed_quarantines_the_middleware_too(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    clock, recorder = FakeClock(), Recorder()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        app = IdempotencyMiddleware(
            shop.app, backend, quarantine=30.0, clock=clock, observer=recorder
        )

        @idempotent("{n}", backend=backend, clock=clock, observer=recorder)  # no quarantine
        async def charge(n: int) -> int:
            return n

        async with client_for(app) as http:
            await http.post("/api/orders", json={"n": 1}, headers=KEY)
            await kill_and_restart_empty(fresh_redis_server)
            clock.advance(1)
            assert await charge(1) == 1  # noticed here; it has no quarantine of its own
            clock.advance(2)
            left = app.quarantine_left
            refused = await http.post("/api/orders", json={"n": 1}, headers=KEY)
    await client.aclose()
    assert left == 28.0  # from the moment the loss was noticed, not from its first claim
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "28"
    assert shop.runs == {"orders": 1}
    assert [(e.block, e.quarantine) for e in recorder.of(BackendDataLost)] == [("idempotent", 0.0)]


async def test_a_claim_in_flight_when_another_guard_notices_a_loss_is_refused(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    # Both claims are sent before either reply is read: the first notices the loss, the
    # second finds the marker the first made (no loss of its own) yet must not run.
    clock, recorder = FakeClock(), Recorder()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        apps = [
            IdempotencyMiddleware(
                shop.app, backend, quarantine=30.0, clock=clock, observer=recorder
            )
            for _ in range(2)
        ]
        async with client_for(apps[0]) as one, client_for(apps[1]) as two:
            await one.post("/api/orders", json={"n": 1}, headers=KEY)
            await kill_and_restart_empty(fresh_redis_server)
            answers = await asyncio.gather(
                one.post("/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"}),
                two.post("/api/orders", json={"n": 3}, headers={"Idempotency-Key": "c"}),
            )
            keys = await client.keys("*idem*:r")
    await client.aclose()
    assert [a.status_code for a in answers] == [503, 503]
    assert shop.runs == {"orders": 1}
    assert keys == []  # both claimed keys released
    assert len(recorder.of(BackendDataLost)) == 1


# -- WAIT for replicas ----------------------------------------------------------------------


@contextlib.contextmanager
def replica_of(master: RedisServer) -> Iterator[RedisServer]:
    """A real replica of *master*, in sync when it is yielded."""
    with redis.Redis.from_url(master.url) as admin:  # sync at once, not after 5 s
        admin.config_set("repl-diskless-sync-delay", 0)
    with RedisServer(args=("--replicaof", master.host, str(master.port))) as replica:
        deadline = time.monotonic() + 20
        with redis.Redis.from_url(replica.url) as probe:
            while probe.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica did not sync"
                time.sleep(0.02)
        yield replica


async def test_with_replicas_a_stored_response_survives_the_master_s_failover(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    with replica_of(fresh_redis_server) as replica:
        client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
        async with RedisBackend(client) as backend:
            app = IdempotencyMiddleware(shop.app, backend, replicas=1, replica_timeout=0.5)
            async with client_for(app) as http:
                first = await http.post("/api/orders", json={"n": 1}, headers=KEY)
        await client.aclose()
        # The master dies the moment the client has its answer; the replica takes over.
        with redis.Redis.from_url(fresh_redis_server.url) as admin:
            os.kill(int(admin.info("server")["process_id"]), signal.SIGKILL)
        fresh_redis_server.stop()
        with redis.Redis.from_url(replica.url) as admin:
            admin.execute_command("REPLICAOF", "NO", "ONE")
        promoted = redis.asyncio.Redis.from_url(replica.url, socket_timeout=1)
        async with RedisBackend(promoted) as backend:
            app = IdempotencyMiddleware(shop.app, backend)
            async with client_for(app) as http:
                again = await http.post("/api/orders", json={"n": 1}, headers=KEY)
        await promoted.aclose()
    assert first.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert shop.runs == {"orders": 1}


async def test_with_replicas_a_result_no_replica_acknowledged_is_not_a_success(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    recorder = Recorder()
    with replica_of(fresh_redis_server) as replica:
        replica.stop()  # the master's only replica is gone
        client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
        async with RedisBackend(client) as backend:
            app = IdempotencyMiddleware(
                shop.app, backend, replicas=1, replica_timeout=0.05, lease=0.5, observer=recorder
            )
            async with client_for(app) as http:
                response = await http.post("/api/stream?size=3", headers=KEY)
        await client.aclose()
    assert response.status_code == 503
    assert response.headers["idempotency-stored"] == "false"
    assert [e.outcome for e in recorder.of(IdempotencyNotStored)] == ["answered 503"]
    (failed,) = recorder.of(BackendFailed)
    assert failed.outcome == "result not stored"
    assert "reached 0 of 1 replicas" in str(failed.error)


def test_replicas_need_a_standalone_redis_and_a_timeout_under_the_backend_s(
    redis_server: RedisServer,
) -> None:
    with pytest.raises(ConfigurationError, match="replicas= needs a RedisBackend"):
        IdempotencyMiddleware(Shop().app, MemoryBackend(), replicas=1)
    with pytest.raises(ConfigurationError, match="replicas must be"):
        idempotent("k", backend=MemoryBackend(), replicas=-1)
    backend = RedisBackend(redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=0.5))
    with pytest.raises(ConfigurationError, match="replica_timeout"):
        IdempotencyMiddleware(Shop().app, backend, replicas=1, replica_timeout=0.5)
