"""The idempotency store of :class:`~resilient.MemoryBackend`."""

from __future__ import annotations

import threading
from time import monotonic_ns

from resilient.backends.memory import MemoryBackend
from resilient.errors import BackendError
from resilient.idempotency.core import Claim, ClaimStatus

__all__ = ["MemoryIdempotencyStore"]

_IN_PROGRESS = 0
_COMPLETED = 1


class _Record:
    __slots__ = ("deadline", "fingerprint", "owner", "payload", "state")

    def __init__(self, fingerprint: str, owner: str, deadline: int) -> None:
        self.state = _IN_PROGRESS
        self.fingerprint = fingerprint
        self.owner = owner
        self.deadline = deadline  # the lease's end, or the end of the retention
        self.payload: bytes | None = None


class MemoryIdempotencyStore:
    """Idempotency records in a dict, bounded by the backend's ``max_keys``.

    Each operation runs under one lock and never awaits inside it, so it is atomic for
    coroutines and threads alike. When the store is full, expired records go first, then
    the completed records closest to expiring. Records in progress are never evicted (that
    would let a duplicate run): a store full of them refuses new claims with
    :class:`~resilient.errors.BackendError`, which the ``on_backend_error`` policy handles.
    """

    __slots__ = ("_data", "_lock", "max_keys")

    def __init__(self, backend: MemoryBackend) -> None:
        self.max_keys = backend.max_keys
        self._data: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

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
            record.deadline = now + lease_ms
        return True

    def _owned(self, key: str, owner: str, now: int) -> _Record | None:
        record = self._live(key, now)
        if record is None or record.state != _IN_PROGRESS or record.owner != owner:
            return None
        return record

    def _evict(self, now: int) -> None:
        data = self._data
        target = max(self.max_keys * 9 // 10, self.max_keys - 1)
        for key in [k for k, r in data.items() if r.deadline <= now]:
            del data[key]
        if len(data) > target:
            completed = sorted((r.deadline, k) for k, r in data.items() if r.state == _COMPLETED)
            for _, key in completed[: len(data) - target]:
                del data[key]
        if len(data) >= self.max_keys:
            msg = f"the idempotency store is full: {len(data)} requests in progress"
            raise BackendError(msg)

    def __repr__(self) -> str:
        return f"MemoryIdempotencyStore({len(self._data)} records, max_keys={self.max_keys})"
