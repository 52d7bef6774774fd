"""The idempotency store of :class:`~resilient.MemoryBackend`."""

from __future__ import annotations

import heapq
import threading
from collections import deque
from time import monotonic_ns
from typing import NamedTuple

from resilient.backends.memory import MemoryBackend
from resilient.errors import BackendError
from resilient.idempotency.core import Claim, ClaimStatus

__all__ = ["MemoryIdempotencyStats", "MemoryIdempotencyStore"]

_IN_PROGRESS = 0
_COMPLETED = 1


class MemoryIdempotencyStats(NamedTuple):
    """What a :class:`MemoryIdempotencyStore` holds: its records, and its eviction index.

    ``records`` is ``len(store)``: records in progress or completed, including those
    expired but not dropped yet (a record is dropped when it is next read, or evicted).
    ``lease_entries`` and ``completed_entries`` count the entries of the index that finds
    what to evict (the running leases, the completed records by expiry), including
    entries left by records gone since, dropped lazily. The store keeps each of them
    proportionate to its records: at most twice as many, plus 64.
    """

    records: int
    lease_entries: int
    completed_entries: int


class _Record:
    __slots__ = ("deadline", "fingerprint", "owner", "payload", "retention", "state")

    def __init__(self, fingerprint: str, owner: str, deadline: int) -> None:
        self.state = _IN_PROGRESS
        self.fingerprint = fingerprint
        self.owner = owner
        self.deadline = deadline  # the lease's end, or the end of the retention
        self.payload: bytes | None = None
        self.retention = 0  # once completed: how long it is kept, ms


class MemoryIdempotencyStore:
    """Idempotency records in a dict, bounded by the backend's ``max_keys``.

    Each operation runs under one lock and never awaits inside it, so it is atomic for
    coroutines and threads alike. A new claim in a full store evicts one record: a lease
    that has run out if there is one (the earliest), else the completed record closest to
    expiring (an expired one first, as it is the closest). A lease still running is never
    evicted: its request is still being handled, and forgetting it would let a retry of
    that same request run it a second time. A store full of running leases refuses the new
    claim with :class:`~resilient.errors.BackendError` instead, which the
    ``on_backend_error`` policy answers (``"closed"``: a 503 the client may retry).

    Eviction costs O(1) amortised for completed records and O(log n) for leases, never a
    walk of every record. Completed records are queued in the order they completed, one
    queue per retention (a store usually sees one or two): records kept equally long
    expire in the order they completed, so the record closest to expiry is at the head of
    one of the queues, found through a small heap of the heads. Running leases, few next
    to the completed records, are in a heap by deadline, updated lazily: a renewed lease
    is not filed again, its entry is checked when it reaches the top and filed again then.
    Entries of records that are gone are dropped as they surface, or all at once when
    they outnumber the records (paid for by the operations that left them).
    """

    __slots__ = (
        "_completed",
        "_data",
        "_heads",
        "_leases",
        "_lock",
        "_queued",
        "max_keys",
    )

    def __init__(self, backend: MemoryBackend) -> None:
        self.max_keys = backend.max_keys
        self._data: dict[str, _Record] = {}
        # (deadline, key): each running lease has an entry whose deadline is <= its own.
        self._leases: list[tuple[int, str]] = []
        # retention -> (deadline, key) of the records completed with it, in that order.
        self._completed: dict[int, deque[tuple[int, str]]] = {}
        self._heads: list[tuple[int, int]] = []  # (deadline of its head, retention) per queue
        self._queued = 0  # entries in the queues, including those of records gone
        self._lock = threading.Lock()

    @property
    def data_lost_at(self) -> None:
        """Always ``None``: records in process memory are lost only with the process."""
        return None

    def __len__(self) -> int:
        """Return the number of records held (see :meth:`stats`)."""
        return len(self._data)

    def stats(self) -> MemoryIdempotencyStats:
        """Return what the store holds: its records and the entries of its eviction index.

        Costs no walk of the records, only of its one queue per retention.

        >>> from resilient import MemoryBackend
        >>> MemoryIdempotencyStore(MemoryBackend()).stats()
        MemoryIdempotencyStats(records=0, lease_entries=0, completed_entries=0)
        """
        with self._lock:
            return MemoryIdempotencyStats(
                len(self._data),
                len(self._leases),
                sum(len(queue) for queue in self._completed.values()),
            )

    def _live(self, key: str, now: int) -> _Record | None:
        record = self._data.get(key)
        if record is not None and record.deadline <= now:
            del self._data[key]
            return None
        return record

    async def claim(
        self, key: str, fingerprint: str, owner: str, lease_ms: int, now_ms: int | None
    ) -> Claim:
        """Take *key* for *owner*, or report what holds it (see :mod:`.core`)."""
        now = monotonic_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            record = self._live(key, now)
            if record is not None:
                if record.fingerprint != fingerprint:
                    return Claim(ClaimStatus.MISMATCH)
                if record.state == _COMPLETED:
                    return Claim(ClaimStatus.COMPLETED, record.payload)
                return Claim(ClaimStatus.IN_PROGRESS, retry_after_ms=record.deadline - now)
            if len(self._data) >= self.max_keys:
                self._evict(now)
            self._data[key] = _Record(fingerprint, owner, now + lease_ms)
            self._push(self._leases, now + lease_ms, key)
        return Claim(ClaimStatus.CLAIMED)

    async def complete(
        self, key: str, owner: str, payload: bytes, ttl_ms: int, now_ms: int | None
    ) -> bool:
        """Store *payload* for *ttl_ms* if *owner* holds a live lease on *key*."""
        now = monotonic_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            record = self._live(key, now)
            if record is not None and record.state == _COMPLETED and record.owner == owner:
                return True  # a repeated call: the owner keeps its completed record
            record = self._owned(key, owner, now)
            if record is None:
                return False
            record.state = _COMPLETED
            record.payload = payload
            record.deadline = now + ttl_ms
            record.retention = ttl_ms
            self._queue(key, record)
        return True

    async def release(self, key: str, owner: str, now_ms: int | None) -> bool:
        """Delete *key* if *owner* holds a live lease on it."""
        now = monotonic_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            if self._owned(key, owner, now) is None:
                return False
            del self._data[key]
        return True

    async def extend(self, key: str, owner: str, lease_ms: int, now_ms: int | None) -> bool:
        """Renew *owner*'s live lease on *key* to *lease_ms* from now."""
        now = monotonic_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            record = self._owned(key, owner, now)
            if record is None:
                return False
            earlier = now + lease_ms < record.deadline
            record.deadline = now + lease_ms
            if earlier:  # its entry in the heap would come too late
                self._push(self._leases, record.deadline, key)
        return True

    def _owned(self, key: str, owner: str, now: int) -> _Record | None:
        record = self._live(key, now)
        if record is None or record.state != _IN_PROGRESS or record.owner != owner:
            return None
        return record

    def _push(self, heap: list[tuple[int, str]], deadline: int, key: str) -> None:
        data = self._data
        for _ in range(2):  # drop what earlier leases left at the top: it rarely piles up
            if not heap:
                break
            first, name = heap[0]
            record = data.get(name)
            if record is not None and record.state == _IN_PROGRESS and record.deadline >= first:
                break
            heapq.heappop(heap)
        heapq.heappush(heap, (deadline, key))
        if len(heap) > 2 * len(data) + 64:  # mostly entries of records gone: rebuild
            heap[:] = [(r.deadline, k) for k, r in data.items() if r.state == _IN_PROGRESS]
            heapq.heapify(heap)

    def _queue(self, key: str, record: _Record) -> None:
        """Queue a record just completed behind those completed with its retention."""
        queue = self._completed.get(record.retention)
        if queue is None:
            queue = self._completed[record.retention] = deque()
            heapq.heappush(self._heads, (record.deadline, record.retention))
        data = self._data
        for _ in range(2):  # drop what records gone left at the head: it rarely piles up
            if not queue:
                break
            head, name = queue[0]
            other = data.get(name)
            if other is not None and other.state == _COMPLETED and other.deadline == head:
                break
            queue.popleft()
            self._queued -= 1
        queue.append((record.deadline, key))
        self._queued += 1
        if (
            self._queued > 2 * len(self._data) + 64
            or len(self._heads) > 2 * len(self._completed) + 64
        ):  # mostly entries of records gone: queue them again
            self._requeue()

    def _requeue(self) -> None:
        groups: dict[int, list[tuple[int, str]]] = {}
        for key, record in self._data.items():
            if record.state == _COMPLETED:
                groups.setdefault(record.retention, []).append((record.deadline, key))
        self._completed = {retention: deque(sorted(g)) for retention, g in groups.items()}
        self._heads = [(queue[0][0], retention) for retention, queue in self._completed.items()]
        heapq.heapify(self._heads)
        self._queued = sum(len(queue) for queue in self._completed.values())

    def _earliest_lease(self) -> tuple[int, str] | None:
        """Return the (deadline, key) of the running lease that ends first, if any."""
        data, heap = self._data, self._leases
        while heap:
            deadline, key = heap[0]
            record = data.get(key)
            if record is None or record.state != _IN_PROGRESS or record.deadline < deadline:
                heapq.heappop(heap)  # a record gone, moved on, or with an earlier entry
            elif record.deadline > deadline:
                heapq.heapreplace(heap, (record.deadline, key))  # renewed since: re-file it
            else:
                return deadline, key
        return None

    def _earliest_completed(self) -> deque[tuple[int, str]] | None:
        """Return the queue whose head is the completed record closest to expiry, if any."""
        data, heads, queues = self._data, self._heads, self._completed
        while heads:
            deadline, retention = heads[0]
            queue = queues.get(retention)
            while queue:
                head, key = queue[0]
                record = data.get(key)
                if record is not None and record.state == _COMPLETED and record.deadline == head:
                    break
                queue.popleft()  # a record gone, or completed again since
                self._queued -= 1
            if not queue:
                if queue is not None:
                    del queues[retention]
                heapq.heappop(heads)
            elif queue[0][0] != deadline:
                heapq.heapreplace(heads, (queue[0][0], retention))  # its head moved on
            else:
                return queue
        return None

    def _evict(self, now: int) -> None:
        """Make room for one record (see the class's docstring for which goes)."""
        lease = self._earliest_lease()
        if lease is not None and lease[0] <= now:
            heapq.heappop(self._leases)
            del self._data[lease[1]]
            return
        queue = self._earliest_completed()
        if queue is not None:
            _, key = queue.popleft()
            self._queued -= 1
            del self._data[key]
            return
        msg = f"the idempotency store is full: {len(self._data)} requests in progress"
        raise BackendError(msg)

    def __repr__(self) -> str:
        return f"MemoryIdempotencyStore({len(self._data)} records, max_keys={self.max_keys})"
