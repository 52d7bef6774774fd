from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient import BackendError, MemoryBackend
from resilient.idempotency import ClaimStatus, IdempotencyMiddleware
from resilient.idempotency.memory import MemoryIdempotencyStore
from tests.idempotency.conftest import Shop, client_for


def store(max_keys: int) -> MemoryIdempotencyStore:
    return MemoryIdempotencyStore(MemoryBackend(max_keys=max_keys))


async def test_expired_records_go_first() -> None:
    s = store(10)
    for i in range(4):
        await s.claim(f"done{i}", "", "o", 100, 0)
        await s.complete(f"done{i}", "o", b"r", 1_000 + i, 0)
    for i in range(3):
        await s.claim(f"gone{i}", "", "o", 5, 0)  # leases over at 5 ms
    for i in range(3):
        await s.claim(f"live{i}", "", "o", 10_000, 0)
    for i in range(3):  # full: each new claim evicts one record, an expired lease first
        await s.claim(f"new{i}", "", "o", 10_000, 10)
    assert len(s) == 10
    for i in range(4):
        assert (await s.claim(f"done{i}", "", "q", 1, 10)).status is ClaimStatus.COMPLETED
    for i in range(3):
        assert (await s.claim(f"live{i}", "", "q", 1, 10)).status is ClaimStatus.IN_PROGRESS


async def test_then_the_completed_records_closest_to_expiry() -> None:
    s = store(10)
    for i in range(7):
        await s.claim(f"done{i}", "", "o", 100, 0)
        await s.complete(f"done{i}", "o", b"r", 1_000 + (i * 7) % 10, 0)  # shuffled expiries
    for i in range(3):
        await s.claim(f"live{i}", "", "o", 10_000, 0)
    await s.claim("new", "", "o", 10_000, 10)
    assert len(s) == 10  # one completed record made room
    expiries = {f"done{i}": 1_000 + (i * 7) % 10 for i in range(7)}
    gone = min(expiries, key=expiries.__getitem__)  # done0 expires first
    for name in sorted(expiries, key=lambda n: n == gone):  # the gone one last: it inserts
        status = (await s.claim(name, "", "q", 1, 10)).status
        assert status is (ClaimStatus.CLAIMED if name == gone else ClaimStatus.COMPLETED)
    for i in range(3):
        assert (await s.claim(f"live{i}", "", "q", 1, 10)).status is ClaimStatus.IN_PROGRESS


async def test_records_in_progress_are_never_evicted() -> None:
    s = store(5)
    for i in range(5):
        await s.claim(f"live{i}", "", "o", 10_000, 0)
    with pytest.raises(BackendError, match="full: 5 requests in progress"):
        await s.claim("one-too-many", "", "o", 10_000, 1)
    for i in range(5):
        assert (await s.claim(f"live{i}", "", "q", 1, 2)).status is ClaimStatus.IN_PROGRESS


def test_claims_from_many_threads_have_one_winner() -> None:
    s = store(1000)
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def contend(n: int) -> None:
        barrier.wait()
        for k in range(200):
            claim = asyncio.run(s.claim(f"k{k}", "", f"t{n}", 10_000, 0))
            if claim.status is ClaimStatus.CLAIMED:
                winners.append(f"k{k}")

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(winners) == sorted(f"k{k}" for k in range(200))


class Unscannable(dict[str, Any]):
    """A dict that counts the walks through it: making room must not walk the records."""

    walks = 0

    def __iter__(self) -> Any:
        type(self).walks += 1
        return super().__iter__()

    def items(self) -> Any:
        type(self).walks += 1
        return super().items()

    def keys(self) -> Any:
        type(self).walks += 1
        return super().keys()

    def values(self) -> Any:
        type(self).walks += 1
        return super().values()


async def test_a_full_store_makes_room_without_walking_its_records() -> None:
    s = store(1_000)
    s._data = Unscannable()
    Unscannable.walks = 0
    for i in range(5_000):  # all unique: the hostile case
        await s.claim(f"k{i}", "", "o", 100, i)
        if i % 2:
            await s.complete(f"k{i}", "o", b"r", 100_000, i)
        else:
            await s.extend(f"k{i}", "o", 200, i)  # at most 100 leases live
    assert len(s) == 1_000
    assert Unscannable.walks == 0


async def test_below_the_bound_churn_never_walks_the_records_either() -> None:
    s = store(1_000_000)
    for i in range(5_000):  # kept a day
        await s.claim(f"kept{i}", "", "o", 100, 0)
        await s.complete(f"kept{i}", "o", b"r", 86_400_000, 0)
    s._data = Unscannable(s._data)
    Unscannable.walks = 0
    for i in range(20_000):  # requests that come and go: released, or expired and read
        await s.claim(f"k{i}", "", "o", 100, i)
        if i % 2:
            await s.release(f"k{i}", "o", i)
        else:
            await s.complete(f"k{i}", "o", b"r", 10, i)
            await s.claim(f"k{i}", "", "o", 100, i + 10)  # expired: dropped, claimed again
            await s.release(f"k{i}", "o", i + 10)
    assert Unscannable.walks == 0
    assert s.stats().lease_entries <= 4  # what is left behind is dropped as it goes


async def test_what_it_keeps_to_make_room_stays_proportionate_to_the_records() -> None:
    s = store(100)
    for i in range(20_000):  # claimed, renewed, then released or completed: heap entries left
        await s.claim(f"k{i % 300}", "", "o", 50, i)
        await s.extend(f"k{i % 300}", "o", 10, i)  # earlier: filed again
        if i % 3:
            await s.release(f"k{i % 300}", "o", i)
        else:
            await s.complete(f"k{i % 300}", "o", b"r", 500, i)
    stats = s.stats()
    assert stats.records == len(s) <= 100
    assert stats.lease_entries <= 2 * 100 + 65
    assert stats.completed_entries <= 2 * 100 + 65


async def test_entries_piled_behind_a_record_never_read_are_dropped_in_bulk() -> None:
    s = store(1_000)
    await s.claim("kept", "", "o", 100, 0)
    await s.complete("kept", "o", b"r", 10, 0)  # never read again: it stays at the head
    for i in range(1, 1_001):  # each claim drops the last record, expired: its entry stays
        await s.claim("churn", "", "o", 100, 20 * i)
        await s.complete("churn", "o", b"r", 10, 20 * i)
    stats = s.stats()
    assert stats.records == len(s) == 2
    assert stats.completed_entries <= 2 * 2 + 65


class BoundedModel:
    """The memory store's records and what it evicts, written as plainly as possible."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.records: dict[str, list[Any]] = {}  # key: [completed, owner, deadline]

    def live(self, key: str, now: int) -> list[Any] | None:
        record = self.records.get(key)
        if record is not None and record[2] <= now:
            del self.records[key]
            return None
        return record

    def claim(self, key: str, owner: str, lease: int, now: int, kept: set[str]) -> str:
        """Claim *key*; *kept* is what the store kept, to tell which of a tie it evicted."""
        record = self.live(key, now)
        if record is not None:
            return "completed" if record[0] else "in_progress"
        if len(self.records) >= self.max_keys:
            ended = {k: r[2] for k, r in self.records.items() if not r[0] and r[2] <= now}
            completed = {k: r[2] for k, r in self.records.items() if r[0]}
            candidates = ended or completed
            if not candidates:
                return "full"
            first = min(candidates.values())
            ties = {k for k, deadline in candidates.items() if deadline == first}
            gone = ties - kept
            assert len(gone) == 1, (ties, kept)  # one of those that end first, and only one
            del self.records[gone.pop()]
        self.records[key] = [False, owner, now + lease]
        return "claimed"

    def owned(self, key: str, owner: str, now: int) -> list[Any] | None:
        record = self.live(key, now)
        return record if record is not None and not record[0] and record[1] == owner else None

    def complete(self, key: str, owner: str, ttl: int, now: int) -> bool:
        done = self.live(key, now)
        if done is not None and done[0] and done[1] == owner:
            return True  # repeated by its owner: nothing changes
        record = self.owned(key, owner, now)
        if record is not None:
            record[:] = [True, owner, now + ttl]
        return record is not None

    def extend(self, key: str, owner: str, lease: int, now: int) -> bool:
        record = self.owned(key, owner, now)
        if record is not None:
            record[2] = now + lease
        return record is not None

    def release(self, key: str, owner: str, now: int) -> bool:
        record = self.owned(key, owner, now)
        if record is not None:
            del self.records[key]
        return record is not None


OPERATIONS = st.lists(
    st.tuples(
        # "request": a claim completed at once, as most are: it fills the store.
        st.sampled_from(["claim", "complete", "extend", "release", "request", "request"]),
        st.integers(0, 9),  # the key
        st.sampled_from(["o1", "o2"]),
        st.sampled_from([5, 20, 40]),  # lease or ttl, ms: a few, as a real store sees
        st.integers(0, 8),  # ms since the previous operation
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations=OPERATIONS, max_keys=st.integers(1, 5))
async def test_eviction_follows_the_plain_model(
    operations: list[tuple[str, int, str, int, int]], max_keys: int
) -> None:
    s, model, now = store(max_keys), BoundedModel(max_keys), 0
    for operation, k, owner, millis, elapsed in operations:
        now += elapsed
        key = f"k{k}"
        if operation == "request":
            try:
                got = (await s.claim(key, "", owner, 10, now)).status.value
            except BackendError:
                got = "full"
            assert got == model.claim(key, owner, 10, now, set(s._data))
            assert await s.complete(key, owner, b"r", millis, now) == model.complete(
                key, owner, millis, now
            )
        elif operation == "claim":
            try:
                got = (await s.claim(key, "", owner, millis, now)).status.value
            except BackendError:
                got = "full"
            assert got == model.claim(key, owner, millis, now, set(s._data))
        elif operation == "complete":
            assert await s.complete(key, owner, b"r", millis, now) == model.complete(
                key, owner, millis, now
            )
        elif operation == "extend":
            assert await s.extend(key, owner, millis, now) == model.extend(key, owner, millis, now)
        else:
            assert await s.release(key, owner, now) == model.release(key, owner, now)
        assert set(s._data) == set(model.records)


async def test_a_store_full_of_running_requests_answers_a_new_key_503_and_runs_none_twice(
    shop: Shop,
) -> None:
    app = IdempotencyMiddleware(shop.app, backend=MemoryBackend(max_keys=2))
    shop.gate.clear()
    async with client_for(app) as client:
        running = [
            asyncio.create_task(
                client.post("/api/slow", json={"n": n}, headers={"Idempotency-Key": f"key-{n}"})
            )
            for n in range(2)
        ]
        for _ in range(10_000):  # both handlers entered: bounded, not a timing assertion
            if shop.runs.get("slow", 0) == 2:
                break
            await asyncio.sleep(0)
        refused = await client.post("/api/slow", json={"n": 2}, headers={"Idempotency-Key": "new"})
        again = await client.post("/api/slow", json={"n": 0}, headers={"Idempotency-Key": "key-0"})
        shop.gate.set()
        first = await asyncio.gather(*running)
        later = await client.post("/api/slow", json={"n": 2}, headers={"Idempotency-Key": "new"})
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert again.status_code == 409  # the running request kept its lease: not run twice
    assert [r.status_code for r in first] == [201, 201]
    assert later.status_code == 201  # a completed record made room
    assert shop.runs == {"slow": 3}
