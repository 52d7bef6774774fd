from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio

from resilient import MemoryBackend, RedisBackend
from resilient.errors import BackendError
from resilient.events import (
    BackendFailed,
    IdempotencyNotStored,
    IdempotencyRejected,
    IdempotencyReplayed,
    LeaseLost,
)
from resilient.idempotency import IdempotencyMiddleware, parse_key
from resilient.idempotency.keeper import store_for
from resilient.idempotency.middleware import default_scope_key
from resilient.testing import FakeClock, RecordingObserver, RedisServer
from tests.idempotency.conftest import Shop, client_for

KEY = {"Idempotency-Key": "8e03978e-40d5-43e8-bc93-6894a57f9324"}


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemoryBackend()
    return request.getfixturevalue("redis_backend")


def middleware(shop: Shop, backend: Any, **options: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(shop.app, backend=backend, **options)


async def test_a_retry_gets_the_first_response_byte_for_byte(shop: Shop, backend: Any) -> None:
    recorder = RecordingObserver()
    async with client_for(middleware(shop, backend, observer=recorder)) as client:
        first = await client.post("/api/orders", json={"sku": "A1"}, headers=KEY)
        second = await client.post("/api/orders", json={"sku": "A1"}, headers=KEY)
    assert shop.runs == {"orders": 1}
    assert first.status_code == second.status_code == 201
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert second.headers["x-order"] == first.headers["x-order"] == "1"
    assert second.headers["content-length"] == first.headers["content-length"]
    assert "set-cookie" in first.headers  # the first client gets its cookie ...
    assert "set-cookie" not in second.headers  # ... which is never stored nor replayed
    assert len(recorder.of(IdempotencyReplayed)) == 1


async def test_the_same_key_with_another_body_is_422(shop: Shop, backend: Any) -> None:
    async with client_for(middleware(shop, backend)) as client:
        await client.post("/api/orders", json={"sku": "A1"}, headers=KEY)
        other = await client.post("/api/orders", json={"sku": "B2"}, headers=KEY)
        query = await client.post("/api/orders?x=1", json={"sku": "A1"}, headers=KEY)
    assert other.status_code == query.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["status"] == 422
    assert shop.runs == {"orders": 1}


async def test_without_a_fingerprint_only_the_key_counts(shop: Shop) -> None:
    async with client_for(middleware(shop, MemoryBackend(), fingerprint=None)) as client:
        await client.post("/api/orders", json={"sku": "A1"}, headers=KEY)
        other = await client.post("/api/orders", json={"sku": "B2"}, headers=KEY)
    assert other.status_code == 201
    assert other.headers["idempotent-replayed"] == "true"


async def test_a_duplicate_in_flight_gets_409_with_retry_after(shop: Shop, backend: Any) -> None:
    shop.gate.clear()
    recorder = RecordingObserver()
    async with client_for(middleware(shop, backend, observer=recorder)) as client:
        first = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await shop.entered.wait()
        duplicate = await client.post("/api/slow", headers=KEY)
        shop.gate.set()
        done = await first
    assert duplicate.status_code == 409
    assert duplicate.headers["retry-after"] == "1"
    assert duplicate.json()["status"] == 409
    assert done.status_code == 201
    assert shop.runs == {"slow": 1}
    assert [e.reason for e in recorder.of(IdempotencyRejected)] == ["in_progress"]


async def test_a_duplicate_can_wait_for_the_first_and_replay_it(shop: Shop, backend: Any) -> None:
    shop.gate.clear()
    async with client_for(middleware(shop, backend, wait=5.0)) as client:
        first = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await shop.entered.wait()
        duplicate = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await asyncio.sleep(0.05)  # the duplicate is now waiting
        assert not duplicate.done()
        shop.gate.set()
        one, two = await first, await duplicate
    assert one.status_code == two.status_code == 201
    assert two.content == one.content
    assert two.headers["idempotent-replayed"] == "true"
    assert shop.runs == {"slow": 1}


async def test_server_errors_are_not_stored_and_the_retry_runs(shop: Shop, backend: Any) -> None:
    async with client_for(middleware(shop, backend)) as client:
        first = await client.post("/api/fail", headers=KEY)
        second = await client.post("/api/fail", headers=KEY)
    assert first.status_code == second.status_code == 503
    assert first.headers["idempotency-stored"] == "false"
    assert "idempotent-replayed" not in second.headers
    assert shop.runs == {"fail": 2}


async def test_an_exception_releases_the_key(shop: Shop, backend: Any) -> None:
    app = middleware(shop, backend)
    async with client_for(app) as client:
        with pytest.raises(RuntimeError, match="the handler failed"):
            await client.post("/api/boom", headers=KEY)
    async with client_for(app, raise_app_exceptions=False) as client:
        second = await client.post("/api/boom", headers=KEY)
    assert second.status_code == 500
    assert shop.runs == {"boom": 2}


@pytest.mark.parametrize("path", ["/api/big", "/api/stream?size=2000"])
async def test_a_body_over_max_body_is_not_stored(shop: Shop, backend: Any, path: str) -> None:
    async with client_for(middleware(shop, backend, max_body=1000)) as client:
        first = await client.post(path, headers=KEY)
        second = await client.post(path, headers=KEY)
    assert first.status_code == second.status_code == 200
    assert first.headers["idempotency-stored"] == "false"
    assert len(first.content) == 2001
    assert first.content.endswith(b"1")
    assert second.content.endswith(b"2")


async def test_a_streamed_body_under_max_body_is_stored(shop: Shop, backend: Any) -> None:
    async with client_for(middleware(shop, backend, max_body=1000)) as client:
        first = await client.post("/api/stream?size=100", headers=KEY)
        second = await client.post("/api/stream?size=100", headers=KEY)
    assert first.content == b"a" * 100 + b"1"
    assert "idempotency-stored" not in first.headers
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"
    assert shop.runs == {"stream": 1}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"abc", "abc"),
        (b'"abc"', "abc"),
        (b'"a b"', "a b"),
        (b'"a\\"b\\\\c"', 'a"b\\c'),
        (b"x" * 255, "x" * 255),
        (b"x" * 256, None),
        (b"", None),
        (b'""', None),
        (b'"abc', None),
        (b'"a\\nb"', None),
        (b'"a"b"', None),
        (b"a b", None),
        (b"caf\xc3\xa9", None),
        (b"tab\there", None),
        (b'"\x7f"', None),
    ],
)
def test_parse_key(value: bytes, expected: str | None) -> None:
    assert parse_key(value) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "x" * 256)],
        [("Idempotency-Key", '"unterminated')],
        [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    ],
)
async def test_a_bad_key_is_400(shop: Shop, headers: list[tuple[str, str]]) -> None:
    async with client_for(middleware(shop, MemoryBackend())) as client:
        response = await client.post("/api/orders", headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "Idempotency-Key" in response.json()["detail"]
    assert shop.runs == {}


async def test_quoted_and_bare_keys_are_the_same_key(shop: Shop) -> None:
    async with client_for(middleware(shop, MemoryBackend())) as client:
        await client.post("/api/orders", headers={"Idempotency-Key": "k1"})
        again = await client.post("/api/orders", headers={"Idempotency-Key": '"k1"'})
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_missing_key_passes_through_unless_required(shop: Shop) -> None:
    async with client_for(middleware(shop, MemoryBackend())) as client:
        assert (await client.post("/api/orders")).status_code == 201
        assert (await client.post("/api/orders")).status_code == 201
    assert shop.runs == {"orders": 2}
    async with client_for(middleware(shop, MemoryBackend(), required=True)) as client:
        response = await client.post("/api/orders")
    assert response.status_code == 400
    assert "needs an Idempotency-Key" in response.json()["detail"]


async def test_required_can_name_routes(shop: Shop) -> None:
    app = middleware(shop, MemoryBackend(), required=["/api/orders"])
    async with client_for(app) as client:
        assert (await client.post("/api/orders")).status_code == 400
        assert (await client.post("/api/fail")).status_code == 503
        assert (await client.get("/api/orders")).status_code == 201  # GET is not guarded


async def test_other_methods_pass_through(shop: Shop) -> None:
    async with client_for(middleware(shop, MemoryBackend())) as client:
        await client.put("/api/orders", headers=KEY)
        await client.put("/api/orders", headers=KEY)
    assert shop.runs == {"orders": 2}


class User:
    is_authenticated = True

    def __init__(self, identity: str) -> None:
        self.identity = identity


async def test_keys_are_scoped_per_user_and_route(shop: Shop) -> None:
    app = middleware(shop, MemoryBackend())
    users = iter(["alice", "bob", "alice"])

    async def with_user(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["user"] = User(next(users))
        await app(scope, receive, send)

    async with client_for(with_user) as client:
        alice = await client.post("/api/orders", headers=KEY)
        bob = await client.post("/api/orders", headers=KEY)
        alice_again = await client.post("/api/orders", headers=KEY)
    assert alice.json()["order"] == 1
    assert bob.json()["order"] == 2
    assert alice_again.json()["order"] == 1
    assert alice_again.headers["idempotent-replayed"] == "true"
    async with client_for(middleware(shop, MemoryBackend())) as client:
        await client.post("/api/orders", headers=KEY)
        other_route = await client.post("/api/stream", headers=KEY)
    assert "idempotent-replayed" not in other_route.headers


async def test_a_large_request_body_is_413(shop: Shop) -> None:
    async with client_for(middleware(shop, MemoryBackend(), max_request_body=100)) as client:
        response = await client.post("/api/orders", content=b"x" * 101, headers=KEY)
    assert response.status_code == 413
    assert shop.runs == {}


async def test_a_lost_lease_is_reported_and_never_overwrites_the_new_owner(shop: Shop) -> None:
    clock, recorder = FakeClock(), RecordingObserver()
    app = middleware(shop, MemoryBackend(), clock=clock, lease=10.0, observer=recorder)
    shop.gate.clear()
    async with client_for(app) as client:
        first = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await shop.entered.wait()
        clock.advance(11)  # the first owner's lease runs out, as if it had crashed
        shop.entered.clear()
        retry = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await shop.entered.wait()  # the retry reclaimed the key and runs
        shop.gate.set()
        one, two = await first, await retry
        replay = await client.post("/api/slow", headers=KEY)
    assert shop.runs == {"slow": 2}
    assert [(e.operation) for e in recorder.of(LeaseLost)] == ["complete"]
    # The first could not store its response: it is refused rather than told of a success.
    assert one.status_code == 503
    assert one.headers["idempotency-stored"] == "false"
    assert [e.outcome for e in recorder.of(IdempotencyNotStored)] == ["answered 503"]
    assert two.status_code == 201
    # The stored response is the one of the owner that held the lease.
    assert replay.json() == two.json()
    assert replay.headers["idempotent-replayed"] == "true"


async def test_the_heartbeat_keeps_a_long_handler_s_lease(shop: Shop) -> None:
    clock, ticks = FakeClock(), asyncio.Queue[None]()
    beats = asyncio.Queue[float]()

    async def sleep(seconds: float) -> None:
        await beats.put(seconds)
        await ticks.get()

    app = middleware(shop, MemoryBackend(), clock=clock, lease=9.0, sleep=sleep)
    shop.gate.clear()
    async with client_for(app) as client:
        first = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await shop.entered.wait()
        for _ in range(5):  # 5 x 6 s: far past the 9 s lease, renewed every 3 s of sleep
            assert await beats.get() == 3.0
            clock.advance(6)
            ticks.put_nowait(None)
        await beats.get()
        duplicate = await client.post("/api/slow", headers=KEY)
        shop.gate.set()
        await first
    assert duplicate.status_code == 409
    assert shop.runs == {"slow": 1}


async def test_redis_down_fails_closed_with_503(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    recorder = RecordingObserver()
    async with RedisBackend(client) as backend:
        app = middleware(shop, backend, observer=recorder, backend_retry_after=7)
        fresh_redis_server.stop()
        async with client_for(app) as http:
            response = await http.post("/api/orders", headers=KEY)
            unkeyed = await http.post("/api/orders")
    await client.aclose()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.headers["content-type"] == "application/problem+json"
    assert unkeyed.status_code == 201  # no key: nothing to guard
    assert shop.runs == {"orders": 1}
    assert [e.outcome for e in recorder.of(BackendFailed)] == ["answered 503"]


async def test_redis_down_can_fail_open(shop: Shop, fresh_redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    recorder = RecordingObserver()
    async with RedisBackend(client) as backend:
        app = middleware(shop, backend, observer=recorder, on_backend_error="open")
        fresh_redis_server.stop()
        async with client_for(app) as http:
            response = await http.post("/api/orders", json={"a": 1}, headers=KEY)
    await client.aclose()
    assert response.status_code == 201
    assert response.json()["echo"] == {"a": 1}  # the body reached the handler
    assert [e.outcome for e in recorder.of(BackendFailed)] == ["ran unguarded"]


async def test_200_concurrent_requests_with_one_key_run_the_handler_once(
    shop: Shop, backend: Any
) -> None:
    async with client_for(middleware(shop, backend)) as client:
        responses = await asyncio.gather(
            *(client.post("/api/orders", json={"n": 1}, headers=KEY) for _ in range(200))
        )
    assert shop.runs == {"orders": 1}
    first = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(first) == 1
    for response in responses:
        if response.status_code == 201:
            assert response.content == first[0].content
        else:
            assert response.status_code == 409


def test_configuration_errors_are_clear() -> None:
    from resilient.errors import ConfigurationError

    cases: list[tuple[dict[str, Any], str]] = [
        ({"ttl": 0}, "ttl must be"),
        ({"lease": -1}, "lease must be"),
        ({"wait": float("nan")}, "wait must be"),
        ({"quarantine": -1}, "quarantine must be"),
        ({"methods": []}, "methods must"),
        ({"max_body": -1}, "max_body must"),
        ({"on_backend_error": "maybe"}, "on_backend_error"),
        ({"header": ""}, "header must"),
        ({"required": ["no-slash"]}, "must start with '/'"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            IdempotencyMiddleware(Shop().app, **options)
    with pytest.raises(ConfigurationError, match="backend must be"):
        IdempotencyMiddleware(Shop().app, backend=object())  # type: ignore[arg-type]


def test_the_backend_is_given_by_keyword_as_every_middleware_s_collaborator() -> None:
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        IdempotencyMiddleware(Shop().app, MemoryBackend())  # type: ignore[call-arg]


async def test_a_client_gone_before_its_body_runs_nothing(shop: Shop) -> None:
    app = middleware(shop, MemoryBackend())
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/orders",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"idempotency-key", b"k")],
    }
    await app(scope, receive, send)
    assert sent == []
    assert shop.runs == {}


async def test_lifespan_and_websocket_scopes_pass_through(shop: Shop) -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = IdempotencyMiddleware(inner)
    await app({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await app({"type": "websocket", "path": "/"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


def test_replay_body_is_exact_json(shop: Shop) -> None:
    # The stored head line must survive any header bytes (latin-1 round trip).
    from resilient.idempotency.core import StoredResponse, decode_response, encode_response

    response = StoredResponse(201, [(b"x-a", bytes(range(256)))], b"\n\x00body\n")
    assert decode_response(encode_response(response)) == response
    assert json.loads(encode_response(response).split(b"\n", 1)[0])["status"] == 201
    with pytest.raises(ValueError, match="not a stored response"):
        decode_response(b"no newline")
    with pytest.raises(ValueError, match="not a stored response"):
        decode_response(b'{"v":2}\nbody')


async def test_an_unreadable_stored_response_is_a_503_not_a_500(shop: Shop) -> None:
    backend = MemoryBackend()
    app = middleware(shop, backend, fingerprint=None)
    store = store_for(backend)
    scope = {"method": "POST", "path": "/api/orders", "root_path": ""}
    scoped = default_scope_key(scope, "k")
    await store.claim(scoped, "", "o", 10_000, None)
    await store.complete(scoped, "o", b"garbage", 10_000, None)
    async with client_for(app) as client:
        response = await client.post("/api/orders", headers={"Idempotency-Key": "k"})
    assert response.status_code == 503
    assert shop.runs == {}


async def test_the_client_sees_the_end_of_the_response_only_once_it_is_stored(
    shop: Shop,
) -> None:
    order: list[str] = []
    inner = store_for(MemoryBackend())

    class WatchedStore:
        """A user-supplied store (the protocol), delegating to the memory one."""

        async def claim(self, *args: Any) -> Any:
            return await inner.claim(*args)

        async def complete(self, *args: Any) -> bool:
            order.append("stored")
            return await inner.complete(*args)

        async def release(self, *args: Any) -> bool:
            return await inner.release(*args)

        async def extend(self, *args: Any) -> bool:
            return await inner.extend(*args)

    app = middleware(shop, WatchedStore())

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        async def watch(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                order.append("end sent")
            await send(message)

        await app(scope, receive, watch)

    async with client_for(outer) as client:
        response = await client.post("/api/orders", headers=KEY)
        replay = await client.post("/api/orders", headers=KEY)
    assert response.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert order == ["stored", "end sent", "end sent"]


async def test_the_default_heartbeat_renews_on_the_event_loop_s_timers(shop: Shop) -> None:
    # The one test on real time: the default heartbeat is a loop timer, not a sleep hook.
    app = middleware(shop, MemoryBackend(), lease=0.15)
    shop.gate.clear()
    async with client_for(app) as client:
        first = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await shop.entered.wait()
        await asyncio.sleep(0.4)  # over twice the lease: alive only if it was renewed
        # Were the lease lost, the duplicate would run and wait at the gate: bound it.
        duplicate = await asyncio.wait_for(client.post("/api/slow", headers=KEY), 2)
        shop.gate.set()
        await first
    assert duplicate.status_code == 409
    assert shop.runs == {"slow": 1}


async def test_redis_stopping_mid_request_never_completes_the_response(
    shop: Shop, fresh_redis_server: RedisServer
) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    recorder = RecordingObserver()
    shop.gate.clear()
    async with RedisBackend(client) as backend:
        app = middleware(shop, backend, observer=recorder, lease=0.5)
        async with client_for(app) as http:
            first = asyncio.create_task(http.post("/api/slow", headers=KEY))
            await shop.entered.wait()
            fresh_redis_server.stop()  # the claim went through; storing the result cannot
            shop.gate.set()
            response = await first
            retry = await http.post("/api/slow", headers=KEY)
    await client.aclose()
    assert response.status_code == 503  # the handler's 201 never reaches the client
    assert response.headers["idempotency-stored"] == "false"
    assert retry.status_code == 503  # and the retry is refused, not run unguarded
    assert shop.runs == {"slow": 1}
    assert [e.outcome for e in recorder.of(IdempotencyNotStored)] == ["answered 503"]
    outcomes = sorted(e.outcome for e in recorder.of(BackendFailed))
    # The heartbeat could not renew the lease meanwhile either.
    renewals = outcomes.count("lease not extended")
    assert outcomes == ["answered 503", *["lease not extended"] * renewals, "result not stored"]


async def test_a_decoding_client_still_replays_bytes(shop: Shop, redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    async with RedisBackend(client) as backend, client_for(middleware(shop, backend)) as http:
        first = await http.post("/api/stream?size=3", headers=KEY)
        again = await http.post("/api/stream?size=3", headers=KEY)
    await client.aclose()
    assert again.content == first.content == b"aaa1"
    assert again.headers["idempotent-replayed"] == "true"


@pytest.mark.cluster
async def test_a_decoding_cluster_client_is_refused_up_front(redis_cluster: Any) -> None:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    from resilient import ConfigurationError

    client = AsyncRedisCluster.from_url(redis_cluster.url, decode_responses=True)
    with pytest.raises(ConfigurationError, match="decode_responses=False"):
        IdempotencyMiddleware(Shop().app, backend=RedisBackend(client))
    await client.aclose()


async def test_complete_is_retried_with_backoff_while_the_heartbeat_keeps_the_lease(
    shop: Shop,
) -> None:
    clock, recorder = FakeClock(), RecordingObserver()
    inner = store_for(MemoryBackend())
    completes: list[float] = []
    extends: list[float] = []
    waits: list[float] = []

    class StalledStore:
        """A user-supplied store whose writes of results fail; its leases still renew."""

        async def claim(self, *args: Any) -> Any:
            return await inner.claim(*args)

        async def complete(self, *args: Any) -> bool:
            completes.append(clock.monotonic())
            raise BackendError("writes are stalled")

        async def release(self, *args: Any) -> bool:
            return await inner.release(*args)

        async def extend(self, *args: Any) -> bool:
            extends.append(clock.monotonic())
            return await inner.extend(*args)

    tick = asyncio.Condition()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if seconds != 1.0:  # a backoff: time passes
            clock.advance(seconds)
            async with tick:
                tick.notify_all()
            await asyncio.sleep(0)  # the heartbeat's turn
            return
        target = clock.monotonic() + seconds  # the heartbeat: waits for the backoffs' time
        async with tick:
            await tick.wait_for(lambda: clock.monotonic() >= target)

    app = middleware(shop, StalledStore(), clock=clock, lease=3.0, sleep=sleep, observer=recorder)
    async with client_for(app) as client:
        response = await client.post("/api/stream?size=3", headers=KEY)
    assert response.status_code == 503
    assert response.headers["idempotency-stored"] == "false"
    backoff = [w for w in waits if w != 1.0]  # the heartbeat sleeps a third of the lease
    assert backoff[:5] == [0.05, 0.1, 0.2, 0.4, 0.5]
    assert max(backoff) == 0.5
    assert len(completes) == len(backoff) + 1
    assert completes[-1] - completes[0] <= 3.0  # bounded by the lease
    assert any(completes[0] < t < completes[-1] for t in extends)  # the lease was kept
    assert [e.outcome for e in recorder.of(BackendFailed)] == ["result not stored"]
    assert [e.outcome for e in recorder.of(IdempotencyNotStored)] == ["answered 503"]
    assert shop.runs == {"stream": 1}


async def test_a_renewal_in_flight_when_the_response_is_stored_is_no_lost_lease(
    shop: Shop,
) -> None:
    inner = store_for(MemoryBackend())
    recorder = RecordingObserver()
    renewing, answer = asyncio.Event(), asyncio.Event()

    class SlowRenewals:
        """A user-supplied store whose lease renewals take their time to answer."""

        async def claim(self, *args: Any) -> Any:
            return await inner.claim(*args)

        async def complete(self, *args: Any) -> bool:
            return await inner.complete(*args)

        async def release(self, *args: Any) -> bool:
            return await inner.release(*args)

        async def extend(self, *args: Any) -> bool:
            renewing.set()
            await answer.wait()
            return await inner.extend(*args)  # the record is completed by now: False

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    app = middleware(shop, SlowRenewals(), sleep=sleep, observer=recorder)
    shop.gate.clear()
    async with client_for(app) as client:
        first = asyncio.create_task(client.post("/api/slow", headers=KEY))
        await renewing.wait()  # a renewal is in flight while the handler ends
        shop.gate.set()
        response = await first
        answer.set()  # the renewal answers after the response was stored
        for _ in range(5):
            await asyncio.sleep(0)
        replay = await client.post("/api/slow", headers=KEY)
    assert response.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert recorder.of(LeaseLost) == []
