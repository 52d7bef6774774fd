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
from resilient.idempotency.redis import RedisIdempotencyStore
from resilient.testing import FakeClock, RecordingObserver, RedisServer
from tests.idempotency.conftest import Shop, client_for

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
    payments, recorder = Payments(fresh_redis_server.url), RecordingObserver()
    app = IdempotencyMiddleware(
        payments.app, backend=payments.backend, lease=5.0, observer=recorder
    )
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
    payments, recorder = Payments(fresh_redis_server.url), RecordingObserver()
    app = IdempotencyMiddleware(
        payments.app, backend=payments.backend, lease=1.0, backend_retry_after=3, observer=recorder
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
    recorder = RecordingObserver()
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
    recorder = RecordingObserver()
    async with RedisBackend(one) as backend_one, RedisBackend(other) as backend_other:
        apps = [
            IdempotencyMiddleware(shop.app, backend=backend, observer=recorder)
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
    clock, recorder = FakeClock(), RecordingObserver()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        app = IdempotencyMiddleware(
            shop.app, backend=backend, quarantine=30.0, clock=clock, observer=recorder
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
    recorder = RecordingObserver()
    with RedisServer(args=("--appendonly", "yes", "--appendfsync", "always")) as server:
        client = redis.asyncio.Redis.from_url(server.url, socket_timeout=1)
        async with RedisBackend(client) as backend:
            app = IdempotencyMiddleware(
                shop.app, backend=backend, quarantine=30.0, observer=recorder
            )
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
    clock, recorder, runs = FakeClock(), RecordingObserver(), []
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
    assert [(e.block, e.quarantine) for e in recorder.of(BackendDataLost)] == [("idempotency", 5.0)]


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
    before = int(time.time() * 1000) / 1000  # Redis TIME, in whole ms
    await store.claim("d", "f", "o4", 1000, None)  # Redis's own clock
    assert store.data_lost_at is not None
    assert before <= store.data_lost_at <= time.time()


async def test_every_store_takes_the_loss_s_moment_from_the_marker(
    redis_client: redis.asyncio.Redis,
) -> None:
    # Four instances of a service: "knew" claimed before the loss, "primed" only read the
    # marker, "late" met Redis only after it, "first" made the marker after the loss
    # without having seen the old one (it cannot tell an emptied server from a new one).
    backends = [RedisBackend(redis_client) for _ in range(4)]  # a channel of its own each
    knew, primed, late, first = (b.store("idempotency", RedisIdempotencyStore) for b in backends)
    await knew.claim("a", "f", "o1", 1000, 1_000)
    await primed.prepare()
    await primed.prepare()  # once is enough: nothing changes
    assert primed.data_lost_at is None
    await redis_client.flushall()
    made = await first.claim("b", "f", "o2", 1000, 2_000)
    assert (made.data_lost, first.data_lost_at) == (False, None)  # unstamped: no alarm yet
    noticed = await primed.claim("c", "f", "o3", 1000, 3_000)  # stamps it: lost at 3 s
    seen = await knew.claim("d", "f", "o4", 1000, 4_000)
    first_sight = await late.claim("e", "f", "o5", 1000, 5_000)
    again = await first.claim("g", "f", "o6", 1000, 6_000)
    assert [noticed.data_lost, seen.data_lost, first_sight.data_lost, again.data_lost] == [
        True,
        True,
        False,  # it lost nothing it knew of
        False,  # nor did the store that made the new marker
    ]
    assert [s.data_lost_at for s in (knew, primed, late, first)] == [3.0] * 4
    for backend in backends:
        await backend.aclose()


async def test_a_claim_that_overtakes_prepare_is_not_undone_by_it(
    redis_client: redis.asyncio.Redis,
) -> None:
    noticer, late = RedisBackend(redis_client), RedisBackend(redis_client)
    first, store = (b.store("idempotency", RedisIdempotencyStore) for b in (noticer, late))
    await first.claim("a", "f", "o1", 1000, 1_000)
    await redis_client.flushall()
    await first.claim("b", "f", "o2", 1000, 2_000)  # stamps the new marker: lost at 2 s
    # The claim is sent first on the backend's channel; prepare's reply (the same marker)
    # is read after the claim's taught the store, and changes nothing.
    claimed, _ = await asyncio.gather(store.claim("c", "f", "o3", 1000, 3_000), store.prepare())
    again = await store.claim("d", "f", "o4", 1000, 4_000)
    assert (claimed.data_lost, again.data_lost, store.data_lost_at) == (False, False, 2.0)
    for backend in (noticer, late):
        await backend.aclose()


async def test_a_marker_written_before_it_held_the_loss_s_moment_still_works(
    redis_backend: RedisBackend, redis_client: redis.asyncio.Redis
) -> None:
    # A rolling upgrade: the previous version wrote the marker as its id alone.
    marker = redis_backend.key("idem", "marker", "m")
    await redis_client.set(marker, "0123abcd")
    old_style = RedisBackend(redis_client)
    store, other = (
        b.store("idempotency", RedisIdempotencyStore) for b in (redis_backend, old_style)
    )
    await store.prepare()
    kept = await store.claim("a", "f", "o1", 1000, 1_000)
    assert (kept.data_lost, store.data_lost_at) == (False, None)
    assert await redis_client.get(marker) == b"0123abcd"  # left as it was: no alarm for anyone
    await redis_client.set(marker, "4567cdef")  # made by a previous version after a loss
    noticed = await store.claim("b", "f", "o2", 1000, 2_000)
    first_sight = await other.claim("c", "f", "o3", 1000, 3_000)
    await old_style.aclose()
    assert (noticed.data_lost, first_sight.data_lost) == (True, False)
    assert store.data_lost_at == other.data_lost_at == 2.0  # stamped by the noticer


async def test_a_loss_noticed_once_quarantines_every_guard_on_the_backend(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    # Two middleware instances and a decorator on one RedisBackend share one store: the
    # first claim after the restart notices the loss for all of them, and each applies its
    # own quarantine from that moment, whether or not it claims anything meanwhile.
    clock, recorder, runs = FakeClock(), RecordingObserver(), []
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        first = IdempotencyMiddleware(
            shop.app, backend=backend, quarantine=30.0, clock=clock, observer=recorder
        )
        second = IdempotencyMiddleware(
            shop.app, backend=backend, quarantine=20.0, clock=clock, observer=recorder
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
    clock, recorder = FakeClock(), RecordingObserver()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        app = IdempotencyMiddleware(
            shop.app, backend=backend, quarantine=30.0, clock=clock, observer=recorder
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
    assert [(e.block, e.quarantine) for e in recorder.of(BackendDataLost)] == [("idempotency", 0.0)]


async def test_a_claim_in_flight_when_another_guard_notices_a_loss_is_refused(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    # Both claims are sent before either reply is read: the first notices the loss, the
    # second finds the marker the first made (no loss of its own) yet must not run.
    clock, recorder = FakeClock(), RecordingObserver()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        apps = [
            IdempotencyMiddleware(
                shop.app, backend=backend, quarantine=30.0, clock=clock, observer=recorder
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
            app = IdempotencyMiddleware(shop.app, backend=backend, replicas=1, replica_timeout=0.5)
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
            app = IdempotencyMiddleware(shop.app, backend=backend)
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
    recorder = RecordingObserver()
    with replica_of(fresh_redis_server) as replica:
        replica.stop()  # the master's only replica is gone
        client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
        async with RedisBackend(client) as backend:
            app = IdempotencyMiddleware(
                shop.app,
                backend=backend,
                replicas=1,
                replica_timeout=0.05,
                lease=0.5,
                observer=recorder,
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
        IdempotencyMiddleware(Shop().app, backend=MemoryBackend(), replicas=1)
    with pytest.raises(ConfigurationError, match="replicas must be"):
        idempotent("k", backend=MemoryBackend(), replicas=-1)
    backend = RedisBackend(redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=0.5))
    with pytest.raises(ConfigurationError, match="replica_timeout"):
        IdempotencyMiddleware(Shop().app, backend=backend, replicas=1, replica_timeout=0.5)


# -- the marker: every instance's quarantine, from the loss's own moment --------------------


def instance(server: RedisServer) -> tuple[redis.asyncio.Redis, RedisBackend]:
    """A client and a backend of their own: one more instance of the service."""
    client = redis.asyncio.Redis.from_url(server.url, socket_timeout=1)
    return client, RedisBackend(client)


def closing_at_shutdown(app: Any, client: redis.asyncio.Redis, backend: RedisBackend) -> Any:
    """*app*, closing *backend* and *client* at its lifespan shutdown, on the server's loop."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def receiving() -> Any:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await backend.aclose()
                await client.aclose()
            return message

        await app(scope, receiving if scope["type"] == "lifespan" else receive, send)

    return wrapped


@pytest.mark.parametrize("fault", ["flushall", "kill -9"])
async def test_claims_in_flight_when_their_own_instance_notices_a_loss_are_refused(
    shop: Shop, fresh_redis_server: RedisServer, fault: str
) -> None:
    # One instance, one middleware, the system's clock (as the shop runs): four claims sent
    # with the marker this store knew before the loss; the first reply to come back
    # teaches the store the new marker, and none of the four may run.
    recorder = RecordingObserver()
    client, backend = instance(fresh_redis_server)
    async with backend:
        app = IdempotencyMiddleware(shop.app, backend=backend, quarantine=30.0, observer=recorder)
        async with client_for(app) as http:
            await http.post("/api/orders", json={"n": 0}, headers=KEY)
            if fault == "flushall":
                await client.flushall()
            else:
                await kill_and_restart_empty(fresh_redis_server)
            answers = await asyncio.gather(
                *(
                    http.post("/api/orders", json={"n": n}, headers={"Idempotency-Key": f"k{n}"})
                    for n in range(4)
                )
            )
            left = app.quarantine_left
            records = await client.keys("*idem*:r")
    await client.aclose()
    assert [a.status_code for a in answers] == [503] * 4
    assert shop.runs == {"orders": 1}
    assert records == []  # every key claimed meanwhile was released
    assert 29.0 < left <= 30.0
    assert len(recorder.of(BackendDataLost)) == 1


async def test_every_instance_ends_its_quarantine_at_the_same_moment(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    # Two instances that both knew the data; the second gets its first request after the
    # restart 3.5 s after the first did. The quarantine runs from the loss as the first
    # noticer recorded it in the marker, not from each instance's own first claim.
    clock, recorder = FakeClock(), RecordingObserver()
    client_one, backend_one = instance(fresh_redis_server)
    client_two, backend_two = instance(fresh_redis_server)
    async with backend_one, backend_two:
        one, two = (
            IdempotencyMiddleware(
                shop.app, backend=b, quarantine=5.0, clock=clock, observer=recorder
            )
            for b in (backend_one, backend_two)
        )
        async with client_for(one) as first, client_for(two) as second:
            await first.post("/api/orders", json={"n": 1}, headers={"Idempotency-Key": "a"})
            await second.post("/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"})
            await kill_and_restart_empty(fresh_redis_server)
            noticed = await first.post(
                "/api/orders", json={"n": 3}, headers={"Idempotency-Key": "c"}
            )
            clock.advance(3.5)
            late = await second.post("/api/orders", json={"n": 4}, headers={"Idempotency-Key": "d"})
            lefts = [one.quarantine_left, two.quarantine_left]
            clock.advance(1.5)
            over = [one.quarantine_left, two.quarantine_left]
            ran = await second.post("/api/orders", json={"n": 4}, headers={"Idempotency-Key": "d"})
    await client_one.aclose()
    await client_two.aclose()
    assert (noticed.status_code, late.status_code) == (503, 503)
    assert (noticed.headers["retry-after"], late.headers["retry-after"]) == ("5", "2")
    assert lefts == [1.5, 1.5]
    assert over == [0.0, 0.0]
    assert ran.status_code == 201
    assert shop.runs == {"orders": 3}
    # Each instance that knew the data reports the loss, once.
    assert len(recorder.of(BackendDataLost)) == 2


async def test_an_instance_that_never_claimed_before_the_loss_learns_it_from_the_marker(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    clock, recorder = FakeClock(), RecordingObserver()
    client_one, backend_one = instance(fresh_redis_server)
    client_two, backend_two = instance(fresh_redis_server)
    async with backend_one, backend_two:
        one, two = (
            IdempotencyMiddleware(
                shop.app, backend=b, quarantine=30.0, clock=clock, observer=recorder
            )
            for b in (backend_one, backend_two)
        )
        async with client_for(one) as first, client_for(two) as second:
            await first.post("/api/orders", json={"n": 1}, headers=KEY)
            await kill_and_restart_empty(fresh_redis_server)
            noticed = await first.post(
                "/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"}
            )
            clock.advance(10)
            newcomer = await second.post("/api/orders", json={"n": 1}, headers=KEY)
            left = two.quarantine_left
            clock.advance(20)
            ran = await second.post("/api/orders", json={"n": 1}, headers=KEY)
    await client_one.aclose()
    await client_two.aclose()
    assert (noticed.status_code, newcomer.status_code) == (503, 503)
    assert newcomer.headers["retry-after"] == "20"
    assert left == 20.0
    assert ran.status_code == 201
    assert shop.runs == {"orders": 2}
    # Only the instance that had known the data reports the loss.
    assert len(recorder.of(BackendDataLost)) == 1


async def test_an_instance_primed_at_startup_notices_a_loss_on_its_first_claim(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    # Neither instance has claimed anything when Redis restarts empty; both learnt the
    # marker at their ASGI lifespan startup (a real uvicorn server). The first request
    # after the loss reaches the second instance: it notices the loss itself, records
    # its moment in the marker, and the first instance's quarantine ends with its own.
    clock, recorder = FakeClock(), RecordingObserver()
    client_one, backend_one = instance(fresh_redis_server)
    client_two, backend_two = instance(fresh_redis_server)
    one, two = (
        IdempotencyMiddleware(shop.app, backend=b, quarantine=30.0, clock=clock, observer=recorder)
        for b in (backend_one, backend_two)
    )
    with (
        serving(closing_at_shutdown(one, client_one, backend_one)) as url_one,
        serving(closing_at_shutdown(two, client_two, backend_two)) as url_two,
    ):
        await kill_and_restart_empty(fresh_redis_server)
        async with httpx.AsyncClient() as http:
            noticed = await http.post(f"{url_two}/api/orders", json={"n": 1}, headers=KEY)
            clock.advance(10)
            other = await http.post(
                f"{url_one}/api/orders", json={"n": 2}, headers={"Idempotency-Key": "b"}
            )
            lefts = [one.quarantine_left, two.quarantine_left]
    assert (noticed.status_code, other.status_code) == (503, 503)
    assert other.headers["retry-after"] == "20"
    assert lefts == [20.0, 20.0]
    assert shop.runs == {}
    assert len(recorder.of(BackendDataLost)) == 2


async def run_lifespan(app: Any) -> list[str]:
    """Start and stop *app*'s ASGI lifespan; return the types of the messages it sent."""
    incoming: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        incoming.put_nowait({"type": kind})
    sent: list[str] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await app(scope, incoming.get, send)
    return sent


@pytest.mark.parametrize("kind", ["redis down", "memory"])
async def test_the_lifespan_starts_whether_or_not_the_marker_can_be_read(
    shop: Shop, fresh_redis_server: RedisServer, kind: str
) -> None:
    recorder = RecordingObserver()
    client, backend = instance(fresh_redis_server)
    fresh_redis_server.stop()
    async with backend:
        store = backend if kind == "redis down" else MemoryBackend()
        app = IdempotencyMiddleware(shop.app, backend=store, quarantine=30.0, observer=recorder)
        sent = await run_lifespan(app)
        await app.prepare()  # called again by hand: same outcome, never raised
    await client.aclose()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    failed = [(e.operation, e.outcome) for e in recorder.of(BackendFailed)]
    if kind == "memory":
        assert failed == []  # nothing to learn
    else:
        assert failed == [("prepare", "marker left to the first claim")] * 2
    assert app.quarantine_left == 0.0


@pytest.mark.cluster
async def test_on_a_cluster_there_is_no_marker_to_prepare(cluster_client: Any, shop: Shop) -> None:
    async with RedisBackend(cluster_client) as backend:
        store = backend.store("idempotency", RedisIdempotencyStore)
        await IdempotencyMiddleware(shop.app, backend=backend, quarantine=30.0).prepare()
        await store.prepare()
        keys = await cluster_client.keys("*idem*")
    assert keys == []
    assert store.data_lost_at is None
