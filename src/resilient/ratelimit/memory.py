"""The rate-limit store of :class:`~resilient.MemoryBackend`: the core, run in process."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Sequence
from time import monotonic_ns
from typing import Final, Protocol

from resilient.backends.memory import MemoryBackend
from resilient.ratelimit.core import Charge, Outcome, Policy, State, evaluate
from resilient.ratelimit.store import Admit

__all__ = ["MemoryRateLimitStore"]

_new = tuple.__new__  # named tuples built from a tuple skip their Python-level __new__

# How many policies check_now keeps a prepared hit for; past that, it starts over.
_KEPT_HITS: Final = 256


class _Hit(Protocol):
    """A prepared hit: an :data:`~resilient.ratelimit.store.Admit` that also takes a cost.

    Adapters call it with the key alone; :meth:`MemoryRateLimitStore.check_now` passes the
    cost and the time of its check too, which default to those it was prepared with.
    """

    def __call__(self, key: str, cost: int = ..., now_ms: int | None = ..., /) -> Charge | None: ...


class MemoryRateLimitStore:
    """Rate-limit state in a dict, bounded by the backend's ``max_keys``.

    An :class:`~resilient.ratelimit.store.ImmediateRateLimitStore`: every check runs
    under one lock and never awaits inside it, so it is atomic for coroutines and
    threads alike. Entries expire when their state stops mattering; a new key in a full
    store evicts the entry closest to expiring (an expired one first, as it is the
    closest): it matters least, while a key serving a long block period is kept the
    longest.

    Eviction costs O(log n) and the hit of a known key nothing more: keys are filed in a
    heap by expiry when they are created, and a later write, which only moves an expiry
    later, is not filed again. An entry reaching the top of the heap with an expiry that
    moved on is filed again then, so the top is always the entry that expires first.
    """

    __slots__ = ("_data", "_expiries", "_hits", "_lock", "max_keys")

    def __init__(self, backend: MemoryBackend) -> None:
        self.max_keys = backend.max_keys
        # By name: a key's state for a policy is named key + "\x00" + policy.id.
        self._data: dict[str, tuple[State, int]] = {}
        # (expiry, name) for every entry, with an expiry <= the entry's own.
        self._expiries: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        # check_now's single-policy hits, by policy id.
        self._hits: dict[str, _Hit] = {}

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
            hit = self._hits.get(policy.id)
            if hit is None:
                hit = self._keep_hit(policy)
            fields = hit(key, cost, now_ms)
            if fields is not None:
                return [_new(Outcome, fields[:4])]
            # Denied: the general path below also records a block period.
        data = self._data
        names = [f"{key}\x00{policy.id}" for policy in policies]
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

    def admitter(
        self,
        policy: Policy,
        *,
        cost: int = 1,
        prefix: str = "",
        now_ms: Callable[[], int] | None = None,
    ) -> Admit:
        """Prepare the hit of *cost* units against *policy* for keys after *prefix*.

        See :meth:`ImmediateRateLimitStore.admitter
        <resilient.ratelimit.store.ImmediateRateLimitStore.admitter>`. The function
        shares its state with :meth:`check_now`: ``admit(key)`` and a check of ``prefix +
        key`` count against the same entry.
        """
        return self._prepare(policy, cost, prefix, now_ms)

    def _keep_hit(self, policy: Policy) -> _Hit:
        hits = self._hits
        if len(hits) >= _KEPT_HITS:
            hits.clear()  # policies made on the fly: start over rather than grow
        hit = hits[policy.id] = self._prepare(policy, 1, "", None)
        return hit

    def _prepare(
        self, policy: Policy, cost: int, prefix: str, clock: Callable[[], int] | None
    ) -> _Hit:
        """Return ``hit(key, cost=cost, now_ms=None)``: the one hit of a single policy.

        It charges *policy* for ``prefix + key`` if it allows and returns the
        algorithm's :data:`~resilient.ratelimit.core.Charge`; else it changes nothing and
        returns ``None``, and :meth:`check_now` gives the full answer (and records a
        block period). This is the hot path of every admitted request: what stays the
        same from one call to the next is looked up once, here, and the name of the
        state is built in one step. An adapter calls it with the key alone;
        :meth:`check_now` passes the cost and the time of its check too.
        """
        suffix = "\x00" + policy.id
        step = policy.step
        data, lock, file = self._data, self._lock, self._file
        prepared_cost = cost

        def hit(key: str, cost: int = prepared_cost, now_ms: int | None = None) -> Charge | None:
            if now_ms is None:
                now_ms = monotonic_ns() // 1_000_000 if clock is None else clock()
            name = f"{prefix}{key}{suffix}"
            # acquire/release: half the cost of ``with lock`` (no __enter__/__exit__ calls).
            lock.acquire()
            try:
                entry = data.get(name)
                state = entry[0] if entry is not None and entry[1] > now_ms else None
                result = step(state, now_ms, cost)
                if not result[0]:
                    return None
                if cost > 0:
                    expires = now_ms + result[5]
                    if entry is None or expires < entry[1]:
                        file(name, expires, now_ms, new=entry is None)
                    data[name] = (result[4], expires)
            finally:
                lock.release()
            return result

        return hit

    async def clear(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget *key*'s state for *policies*."""
        with self._lock:
            for policy in policies:
                self._data.pop(f"{key}\x00{policy.id}", None)

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
