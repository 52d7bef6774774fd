"""The in-process backend."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from resilient.errors import ConfigurationError

__all__ = ["MemoryBackend"]

_T = TypeVar("_T")


class MemoryBackend:
    """Keep state in this process's memory: the embedded default.

    Each block's store holds at most *max_keys* keys; a new key in a full store evicts one,
    in O(1) or O(log n) (never a walk of every key). Which one is each store's choice:
    the rate-limit entry that expires first; an ended lease, else the completed
    idempotency record closest to expiry (a running lease never: a store full of them
    refuses new claims); the least recently used cache entry. State is not shared with
    other processes; use :class:`~resilient.RedisBackend` when several workers must agree.

    >>> from resilient import RateLimiter
    >>> limiter = RateLimiter(MemoryBackend(max_keys=50_000))
    """

    __slots__ = ("_lock", "_stores", "max_keys")

    def __init__(self, *, max_keys: int = 100_000) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            msg = f"max_keys must be a positive integer, not {max_keys!r}"
            raise ConfigurationError(msg)
        self.max_keys = max_keys
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def store(self, name: str, factory: Callable[[MemoryBackend], _T]) -> _T:
        """Return this backend's store called *name*, made by *factory* on first use.

        Every block that uses this backend with the same store name shares that store.
        """
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = self._stores[name] = factory(self)
        return store

    def __repr__(self) -> str:
        return f"MemoryBackend(max_keys={self.max_keys})"
