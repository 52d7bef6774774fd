"""``BreakerRegistry`` of breakers that share their state through Redis.

A breaker the registry drops leaves its backend's store: the same key can be asked for
again (its new breaker takes up the shared state on its next sync), the store holds only
the registry's live breakers, and a sync reads those, one round trip each. The work is
counted, not timed: the store's members, and the scripts Redis ran.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

from resilient import RedisBackend, ResilientTransport, SyncResilientTransport
from resilient.breaker import BreakerRegistry, CircuitBreaker, State
from resilient.breaker.redis import SharedBreakerStore
from resilient.testing import FakeClock, RedisServer
from tests.breaker.test_registry import STEPS, Model
from tests.breaker.test_shared import evalsha_calls, ok, state, trip


def shared_factory(backend: RedisBackend, clock: FakeClock | None = None) -> Any:
    def make(key: str) -> CircuitBreaker:
        return CircuitBreaker(
            f"http:{key}",
            backend=backend,
            clock=clock,
            observer=None,
            failure_rate=0.5,
            minimum_calls=2,
            window=2,
            open_for=10.0,
            sync_interval=60.0,  # the tests sync by hand
        )

    return make


def store_of(backend: RedisBackend) -> SharedBreakerStore:
    return backend.store("breaker", SharedBreakerStore)


def test_a_shared_breaker_dropped_by_the_registry_can_be_asked_for_again() -> None:
    backend = RedisBackend(redis.asyncio.Redis())  # no command is sent: no server needed
    registry = BreakerRegistry(shared_factory(backend), max_size=2)
    first = registry.get("a")
    registry.get("b")
    registry.get("c")  # a, the least recently used, goes
    again = registry.get("a")  # raised "another breaker named 'http:a' already shares" before
    assert again is not first
    assert again.shared_store is store_of(backend)
    assert first.shared_store is None  # the dropped one decides alone from now on
    store = store_of(backend)
    assert len(store) == 2
    assert "http:a" in store
    assert "http:b" not in store


def test_many_made_up_keys_leave_the_store_as_small_as_the_registry() -> None:
    backend = RedisBackend(redis.asyncio.Redis())
    registry = BreakerRegistry(shared_factory(backend), max_size=8)
    for i in range(5_000):
        registry.get(f"made-up-{i}.example")
    assert len(registry) == len(store_of(backend)) == 8


@given(max_size=st.integers(1, 4), steps=STEPS)
def test_the_store_holds_exactly_the_registrys_breakers(
    max_size: int, steps: list[tuple[str, str]]
) -> None:
    backend = RedisBackend(redis.asyncio.Redis())
    registry = BreakerRegistry(shared_factory(backend), max_size=max_size)
    store = store_of(backend)
    model = Model(max_size)
    for action, key in steps:
        if action == "get":
            breaker = registry.get(key)
            known = model.breakers.get(key)
            if known is not None:
                assert breaker is known
            model.get(key, breaker)
        elif key in model.breakers:
            breaker = model.breakers[key]
            breaker.force_open() if action == "open" else breaker.reset()
        assert {b.name for b in registry} == {f"http:{k}" for k in model.breakers}
        assert len(store) == len(model.breakers)
        assert all(b.name in store and b.shared_store is store for b in registry)


def test_a_detached_name_can_be_shared_again_and_a_duplicate_still_cannot() -> None:
    backend = RedisBackend(redis.asyncio.Redis())
    one = CircuitBreaker("dup", backend=backend, observer=None)
    one.detach()
    one.detach()  # twice: nothing more
    two = CircuitBreaker("dup", backend=backend, observer=None)
    assert two.shared_store is not None
    assert one.shared_store is None
    with pytest.raises(Exception, match="already shares"):
        CircuitBreaker("dup", backend=backend, observer=None)
    CircuitBreaker("local", observer=None).detach()  # not shared: nothing to leave


async def test_a_key_made_again_takes_up_the_shared_state_and_a_sync_reads_only_live_breakers(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    ours, theirs = two_backends
    registry = BreakerRegistry(shared_factory(ours, clock), max_size=3)
    for i in range(50):  # a hostile key distribution: made-up hosts
        registry.get(f"h{i}")
    other = shared_factory(theirs, clock)("h0")  # another instance trips h0's circuit
    await trip(other)
    await store_of(theirs).sync_now()  # publishes the opening

    again = registry.get("h0")  # h0 was dropped long ago: a new breaker
    assert state(again) is State.CLOSED
    store = store_of(ours)
    await asyncio.sleep(0)  # the sync task's first pass, if it is still under way
    await store.sync_now()
    assert state(again) is State.OPEN  # the shared opening, taken up on its first sync

    before = await evalsha_calls(ours.client)
    await store.sync_now()
    assert await evalsha_calls(ours.client) - before == len(registry) == len(store) == 3


async def test_a_transport_with_shared_breakers_per_origin_serves_an_origin_it_dropped(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    backend = two_backends[0]
    registry = BreakerRegistry(shared_factory(backend), max_size=2)
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    async with httpx.AsyncClient(transport=ResilientTransport(inner, breaker=registry)) as http:
        for host in ["a", "b", "c", "a", "d", "b"]:  # a and b come back after being dropped
            response = await http.get(f"http://{host}.test/")
            assert response.status_code == 200
    assert len(store_of(backend)) == len(registry) == 2


async def test_a_closed_transport_leaves_the_store_to_the_next_one(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    backend = two_backends[0]
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    for _ in range(2):  # a client per job, say, with the same factory
        transport = ResilientTransport(inner, breaker=shared_factory(backend))
        async with httpx.AsyncClient(transport=transport) as http:
            assert (await http.get("http://a.test/")).status_code == 200
    assert len(store_of(backend)) == 0


async def test_transitions_while_redis_is_away_queue_one_publication_per_breaker(
    fresh_redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        registry = BreakerRegistry(shared_factory(backend, clock), max_size=3)
        breakers = [registry.get(host) for host in "abc"]
        store = store_of(backend)
        fresh_redis_server.stop()
        await store.sync_now()  # cannot read: each breaker decides alone
        for _ in range(20):  # opened and closed again and again, locally
            for breaker in breakers:
                await trip(breaker)
            clock.advance(10)
            for breaker in breakers:
                assert await breaker.call(ok) == "ok"  # its own probe, which closes it
                assert state(breaker) is State.CLOSED
        for breaker in breakers:
            await trip(breaker)  # the latest: open
        fresh_redis_server.start()  # empty, its command counts at zero
        await store.sync_now()
        # One publication per breaker, its latest transition: the shared generation
        # counts the openings published (a queue of every transition made it 21).
        for breaker in breakers:
            shared = await client.hmget(backend.key("cb", breaker.name, "s"), ["s", "g"])
            assert shared == [b"o", b"1"]
    await client.aclose()


def test_a_closed_sync_transport_leaves_the_store_to_the_next_one() -> None:
    backend = RedisBackend(redis.asyncio.Redis())  # closed circuits send no command
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    for _ in range(2):
        transport = SyncResilientTransport(inner, breaker=shared_factory(backend))
        with httpx.Client(transport=transport) as http:
            assert http.get("http://a.test/").status_code == 200
        assert len(store_of(backend)) == 0


async def test_a_breaker_given_to_a_transport_stays_shared_when_it_closes(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    backend = two_backends[0]
    breaker = shared_factory(backend)("everyone")
    registry = BreakerRegistry(shared_factory(backend))
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    for choice in (breaker, registry):
        async with httpx.AsyncClient(transport=ResilientTransport(inner, breaker=choice)) as http:
            assert (await http.get("http://a.test/")).status_code == 200
    assert breaker.shared_store is store_of(backend)  # the caller's: not the transport's
    assert len(registry) == 1
    assert len(store_of(backend)) == 2


async def test_a_breaker_detached_while_its_sync_is_on_the_wire_is_left_alone(
    two_backends: tuple[RedisBackend, RedisBackend],
) -> None:
    clock = FakeClock()
    ours, theirs = two_backends
    breaker = shared_factory(ours, clock)("h")
    other = shared_factory(theirs, clock)("h")
    await trip(other)
    await store_of(theirs).sync_now()  # the shared state: open
    store = store_of(ours)
    await asyncio.sleep(0)
    await store.sync_now()  # the sync task's first pass is over
    breaker.reset()  # closed here, until its next sync
    sync = asyncio.create_task(store.sync_now())
    await asyncio.sleep(0)  # its read of the shared state is on the wire
    breaker.detach()
    await sync
    assert state(breaker) is State.CLOSED  # the answer came for a breaker that left
    assert len(store) == 0
