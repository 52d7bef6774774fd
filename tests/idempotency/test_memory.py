from __future__ import annotations

import threading

import pytest

from resilient import BackendError, MemoryBackend
from resilient.idempotency import ClaimStatus
from resilient.idempotency.memory import MemoryIdempotencyStore


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
    await s.claim("new", "", "o", 10_000, 10)  # full: the sweep runs
    assert len(s) == 8  # the 3 expired went; nothing else had to
    for i in range(4):
        assert (await s.claim(f"done{i}", "", "q", 1, 10)).status is ClaimStatus.COMPLETED


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
    import asyncio

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
