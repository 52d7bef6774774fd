"""The idempotency stores against a plain model of the record's life (see core.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import redis.asyncio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import MemoryBackend, RedisBackend
from resilient.idempotency import Claim, ClaimStatus, IdempotencyStore
from resilient.idempotency.keeper import store_for
from resilient.testing import RedisCluster, RedisServer

_T = TypeVar("_T")

KEYS = st.sampled_from(["a", "b", "{c}", "user:1\x1fPOST\x1f/api/orders\x1fk"])
FINGERPRINTS = st.sampled_from(["", "f1", "f2"])
PAYLOADS = st.binary(max_size=64) | st.sampled_from([b"", b"\n\x00\xff", b'{"v":1}\nbody'])
MILLIS = st.integers(min_value=1, max_value=10_000)


@dataclass
class Record:
    completed: bool
    fingerprint: str
    owner: str
    deadline: int
    payload: bytes = b""


class Model:
    """The record's life, written as plainly as possible."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}

    def live(self, key: str, now: int) -> Record | None:
        record = self.records.get(key)
        if record is None or record.deadline <= now:
            return None
        return record

    def claim(self, key: str, fingerprint: str, owner: str, lease: int, now: int) -> Claim:
        record = self.live(key, now)
        if record is None:
            self.records[key] = Record(False, fingerprint, owner, now + lease)
            return Claim(ClaimStatus.CLAIMED)
        if record.fingerprint != fingerprint:
            return Claim(ClaimStatus.MISMATCH)
        if record.completed:
            return Claim(ClaimStatus.COMPLETED, record.payload)
        return Claim(ClaimStatus.IN_PROGRESS, retry_after_ms=record.deadline - now)

    def owned(self, key: str, owner: str, now: int) -> Record | None:
        record = self.live(key, now)
        if record is None or record.completed or record.owner != owner:
            return None
        return record

    def complete(self, key: str, owner: str, payload: bytes, ttl: int, now: int) -> bool:
        done = self.live(key, now)
        if done is not None and done.completed and done.owner == owner:
            return True  # repeated by its owner: nothing changes
        record = self.owned(key, owner, now)
        if record is None:
            return False
        self.records[key] = Record(True, record.fingerprint, owner, now + ttl, payload)
        return True

    def release(self, key: str, owner: str, now: int) -> bool:
        if self.owned(key, owner, now) is None:
            return False
        del self.records[key]
        return True

    def extend(self, key: str, owner: str, lease: int, now: int) -> bool:
        record = self.owned(key, owner, now)
        if record is None:
            return False
        record.deadline = now + lease
        return True


class StoreMachine(RuleBasedStateMachine):
    """Random traces of claim/complete/release/extend and time, store vs model."""

    owners = Bundle("owners")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model = Model()
        self.now = 1_700_000_000_000
        self.counter = 0
        self.store: IdempotencyStore = self.run(self.make_store())

    async def make_store(self) -> IdempotencyStore:
        raise NotImplementedError

    async def close_store(self) -> None:
        return None

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.close_store())
        self.loop.close()

    @initialize(target=owners)
    def first_owner(self) -> str:
        return "owner-0"

    @rule(ms=st.integers(min_value=0, max_value=6_000))
    def advance(self, ms: int) -> None:
        self.now += ms

    @rule(target=owners, key=KEYS, fingerprint=FINGERPRINTS, lease=MILLIS)
    def claim(self, key: str, fingerprint: str, lease: int) -> str:
        self.counter += 1
        owner = f"owner-{self.counter}"
        got = self.run(self.store.claim(key, fingerprint, owner, lease, self.now))
        assert got == self.model.claim(key, fingerprint, owner, lease, self.now)
        return owner

    @rule(key=KEYS, owner=owners, payload=PAYLOADS, ttl=MILLIS)
    def complete(self, key: str, owner: str, payload: bytes, ttl: int) -> None:
        got = self.run(self.store.complete(key, owner, payload, ttl, self.now))
        assert got == self.model.complete(key, owner, payload, ttl, self.now)

    @rule(key=KEYS, owner=owners)
    def release(self, key: str, owner: str) -> None:
        got = self.run(self.store.release(key, owner, self.now))
        assert got == self.model.release(key, owner, self.now)

    @rule(key=KEYS, owner=owners, lease=MILLIS)
    def extend(self, key: str, owner: str, lease: int) -> None:
        got = self.run(self.store.extend(key, owner, lease, self.now))
        assert got == self.model.extend(key, owner, lease, self.now)

    @invariant()
    def a_stranger_owns_nothing(self) -> None:
        # An owner token nobody was given can never complete, release or extend.
        for key in ("a", "b"):
            assert self.run(self.store.extend(key, "stranger", 1, self.now)) is False


def _machine(factory: Callable[[], Coroutine[Any, Any, tuple[IdempotencyStore, Any]]]) -> type:
    class Machine(StoreMachine):
        async def make_store(self) -> IdempotencyStore:
            store, self.resource = await factory()
            return store

        async def close_store(self) -> None:
            if self.resource is not None:
                await self.resource()

    return Machine


def test_memory_store_follows_the_model() -> None:
    async def factory() -> tuple[IdempotencyStore, Any]:
        return store_for(MemoryBackend()), None

    run_state_machine_as_test(_machine(factory), settings=settings(stateful_step_count=40))


@pytest.mark.redis
def test_redis_store_follows_the_model(redis_server: RedisServer) -> None:
    if not redis_server.is_running:
        redis_server.start()

    async def factory() -> tuple[IdempotencyStore, Any]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        await client.flushall()
        backend = RedisBackend(client)

        async def close() -> None:
            await backend.aclose()
            await client.aclose()

        return store_for(backend), close

    run_state_machine_as_test(
        _machine(factory), settings=settings(stateful_step_count=40, max_examples=60)
    )


@pytest.mark.cluster
def test_cluster_store_follows_the_model(redis_cluster: RedisCluster) -> None:
    async def factory() -> tuple[IdempotencyStore, Any]:
        client = AsyncRedisCluster.from_url(redis_cluster.url)
        await client.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)

        async def close() -> None:
            await client.aclose()

        return store_for(RedisBackend(client)), close

    run_state_machine_as_test(
        _machine(factory), settings=settings(stateful_step_count=30, max_examples=25)
    )
