"""The rate-limit store of :class:`~resilient.MemoryBackend`: the core, run in process."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from time import monotonic_ns

from resilient.backends.memory import MemoryBackend
from resilient.ratelimit.core import _ALGORITHMS, Outcome, Policy, State, _Result, evaluate

_new = tuple.__new__  # named tuples built from a tuple skip their Python-level __new__

__all__ = ["MemoryRateLimitStore", "name_suffix"]


def name_suffix(policy: Policy) -> str:
    """Return what follows a key in the name of its state for *policy*.

    A key's state for a policy is stored under ``key + name_suffix(policy)``, so an
    adapter that knows the key's prefix and the policy in advance can build the name in
    one step.
    """
    return "\x00" + policy.id


class MemoryRateLimitStore:
    """Rate-limit state in a dict, bounded by the backend's ``max_keys``.

    Every check runs under one lock and never awaits inside it, so it is atomic for
    coroutines and threads alike. Entries expire when their state stops mattering; a new
    key in a full store evicts the entry closest to expiring (an expired one first, as it
    is the closest): it matters least, while a key serving a long block period is kept
    the longest.

    Eviction costs O(log n) and the hit of a known key nothing more: keys are filed in a
    heap by expiry when they are created, and a later write, which only moves an expiry
    later, is not filed again. An entry reaching the top of the heap with an expiry that
    moved on is filed again then, so the top is always the entry that expires first.
    """

    __slots__ = ("_data", "_expiries", "_lock", "max_keys")

    def __init__(self, backend: MemoryBackend) -> None:
        self.max_keys = backend.max_keys
        self._data: dict[str, tuple[State, int]] = {}
        # (expiry, name) for every entry, with an expiry <= the entry's own.
        self._expiries: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    async def check(
        self,
        key: str,
        policies: Sequence[Policy],
        cost: int,
        now_ms: int | None,
        consume: bool,
    ) -> list[Outcome]:
        """Check *cost* units of *key* against *policies*; see :func:`evaluate`."""
        return self.check_now(key, policies, cost, now_ms, consume)

    def check_now(
        self,
        key: str,
        policies: Sequence[Policy],
        cost: int,
        now_ms: int | None,
        consume: bool,
    ) -> list[Outcome]:
        """Do :meth:`check` synchronously (it never blocks on I/O)."""
        if now_ms is None:
            now_ms = monotonic_ns() // 1_000_000
        if consume and len(policies) == 1:
            policy = policies[0]
            fields = self._hit_named(key + name_suffix(policy), policy, cost, now_ms)
            if fields is not None:
                return [_new(Outcome, fields[:4])]
            # Denied: the general path below also records a block period.
        data = self._data
        names = [key + name_suffix(policy) for policy in policies]
        with self._lock:
            entries = [data.get(name) for name in names]
            states = [e[0] if e is not None and e[1] > now_ms else None for e in entries]
            outcomes, writes = evaluate(policies, states, now_ms, cost, consume=consume)
            for name, entry, write in zip(names, entries, writes, strict=True):
                if write is not None:
                    expires = now_ms + write.ttl_ms
                    if entry is None or expires < entry[1]:
                        self._file(name, expires, now_ms, new=entry is None)
                    data[name] = (write.state, expires)
        return outcomes

    def _hit_named(
        self, name: str, policy: Policy, cost: int, now_ms: int | None
    ) -> _Result | None:
        """Charge one policy for the state *name* if it allows; else change nothing.

        Returns the algorithm's flat result, whose first four fields are those of the
        Outcome, or ``None`` when denied: :meth:`check_now` then gives the full answer
        (and records a block period). *name* is ``key + name_suffix(policy)``. This is
        the hot path of every admitted request: it spares making an Outcome, and callers
        that know the key's prefix in advance build the name in one step.
        """
        if now_ms is None:
            now_ms = monotonic_ns() // 1_000_000
        data = self._data
        lock = self._lock
        # acquire/release: half the cost of ``with lock`` (no __enter__/__exit__ calls).
        lock.acquire()
        try:
            entry = data.get(name)
            state = entry[0] if entry is not None and entry[1] > now_ms else None
            # charge(), inlined and without its Outcome: the algorithm's flat result.
            result: _Result = _ALGORITHMS[policy.kind](policy, state, now_ms, cost)  # type: ignore[misc]
            if not result[0]:
                return None
            if cost > 0:
                expires = now_ms + result[5]
                if entry is None or expires < entry[1]:
                    self._file(name, expires, now_ms, new=entry is None)
                data[name] = (result[4], expires)
        finally:
            lock.release()
        return result

    async def clear(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget *key*'s state for *policies*."""
        with self._lock:
            for policy in policies:
                self._data.pop(key + name_suffix(policy), None)

    def __len__(self) -> int:
        return len(self._data)

    def _file(self, name: str, expires: int, now_ms: int, *, new: bool) -> None:
        """File *name* by *expiry* before it is written; make room first if it is new."""
        data, heap = self._data, self._expiries
        if new and len(data) >= self.max_keys:
            self._evict()
        for _ in range(2):  # drop what cleared keys left at the top: it rarely piles up
            if not heap:
                break
            first, other = heap[0]
            entry = data.get(other)
            if entry is not None and entry[1] >= first:
                break
            heapq.heappop(heap)
        if len(heap) > 2 * len(data) + 64:  # mostly entries of cleared keys: rebuild
            heap[:] = [(expires, name) for name, (_, expires) in data.items()]
            heapq.heapify(heap)
        heapq.heappush(heap, (expires, name))

    def _evict(self) -> None:
        """Forget the entry that expires first: it matters least."""
        data, heap = self._data, self._expiries
        while heap:
            expires, name = heap[0]
            entry = data.get(name)
            if entry is None or entry[1] < expires:
                heapq.heappop(heap)  # cleared, or filed again earlier
            elif entry[1] > expires:
                heapq.heapreplace(heap, (entry[1], name))  # written since: file it again
            else:
                heapq.heappop(heap)
                del data[name]
                return
