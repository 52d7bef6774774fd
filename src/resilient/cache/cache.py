"""``Cache``: cache-aside that loads each key once, however many callers miss it at once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from resilient.backends.memory import MemoryBackend
from resilient.cache.core import (
    MISSING,
    Entry,
    JSONSerializer,
    Serializer,
    jittered_ttl,
    should_refresh_early,
    validate_seconds,
)
from resilient.cache.memory import MemoryCacheStore
from resilient.clock import Clock, SystemClock
from resilient.errors import ConfigurationError
from resilient.events import (
    CacheHit,
    CacheMiss,
    CacheRefreshed,
    LoggingObserver,
    Observer,
    StaleServed,
    emit,
)

__all__ = ["Cache"]

_T = TypeVar("_T")
_DEFAULT_OBSERVER = LoggingObserver()


class Cache:
    """Cache-aside with single flight, early refresh and stale serving.

    :meth:`get_or_load` returns the cached value of a key, or runs *loader* to compute it.
    Concurrent misses on one key share one loader call (a caller that is cancelled does
    not cancel it for the others; a failure reaches every waiter and is not cached).

    Values live for *ttl* seconds, shortened by a random share of up to *jitter* so that
    keys set together do not expire together. Before expiry, a read may recompute the
    value early in the background, the more likely the closer the expiry and the slower
    the loader (XFetch, with *beta*; 0 turns it off). After expiry, a value is served
    stale for up to *stale_while_revalidate* seconds while one background load refreshes
    it, and for up to *stale_if_error* seconds when the loader fails. ``None`` results
    are cached only with *negative_ttl* (for "not found"). Values are stored with
    *serializer* (JSON by default; nothing is ever unpickled).

    >>> cache = Cache(ttl=600, stale_while_revalidate=30)
    >>> async def product(product_id: int) -> dict[str, object]:
    ...     return await cache.get_or_load(f"product:{product_id}", lambda: load(product_id))
    """

    __slots__ = (
        "_flights",
        "_store",
        "beta",
        "clock",
        "jitter",
        "negative_ttl",
        "observer",
        "rng",
        "serializer",
        "stale_if_error",
        "stale_while_revalidate",
        "ttl",
    )

    def __init__(
        self,
        backend: MemoryBackend | None = None,
        *,
        ttl: float = 600.0,
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        beta: float = 1.0,
        jitter: float = 0.1,
        negative_ttl: float | None = None,
        serializer: Serializer | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        observer: Observer | None = _DEFAULT_OBSERVER,
    ) -> None:
        self.ttl = validate_seconds("ttl", ttl, allow_zero=False)
        self.stale_while_revalidate = validate_seconds(
            "stale_while_revalidate", stale_while_revalidate
        )
        self.stale_if_error = validate_seconds("stale_if_error", stale_if_error)
        self.beta = validate_seconds("beta", beta)
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
            msg = f"jitter must be a fraction in [0, 1), not {jitter!r}"
            raise ConfigurationError(msg)
        self.jitter = float(jitter)
        self.negative_ttl = (
            None if negative_ttl is None else validate_seconds("negative_ttl", negative_ttl)
        )
        self.serializer: Serializer = serializer or JSONSerializer()
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()  # noqa: S311 (spreading expiries, not secrets)
        self.observer = observer
        if backend is None:
            backend = MemoryBackend()
        if not isinstance(backend, MemoryBackend):
            msg = f"a cache needs a MemoryBackend, not {backend!r}"
            raise ConfigurationError(msg)
        self._store = backend.store("cache", MemoryCacheStore)
        self._flights: dict[str, asyncio.Task[Any]] = {}

    # --- plain operations ---------------------------------------------------------------

    async def get(self, key: str) -> Any:
        """Return *key*'s fresh value, or :data:`~resilient.cache.MISSING`."""
        entry = await self._store.get(key, self.clock.time())
        if entry is None or not entry.fresh(self.clock.time()):
            return MISSING
        return self.serializer.loads(entry.data)

    async def set(
        self, key: str, value: Any, *, ttl: float | None = None, tags: Iterable[str] = ()
    ) -> None:
        """Store *value* under *key* for *ttl* seconds (default: the cache's), with *tags*."""
        await self._put(key, value, ttl, tags, delta=0.0)

    async def delete(self, key: str) -> None:
        """Forget *key*."""
        await self._store.delete(key)

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Forget every value stored with any of *tags*."""
        await self._store.invalidate_tags(list(tags))

    # --- cache-aside --------------------------------------------------------------------

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[_T]],
        *,
        ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> _T:
        """Return *key*'s value, loading it with *loader* once for all concurrent misses."""
        now = self.clock.time()
        entry = await self._store.get(key, now)
        if entry is not None:
            if entry.fresh(now):
                if should_refresh_early(entry, now, self.beta, self.rng):
                    self._background(key, loader, ttl, tags, "early")
                emit(self.observer, CacheHit("cache", key))
                return self.serializer.loads(entry.data)  # type: ignore[no-any-return]
            if now < entry.expires_at + self.stale_while_revalidate:
                self._background(key, loader, ttl, tags, "stale")
                emit(self.observer, StaleServed("cache", key, "revalidating"))
                return self.serializer.loads(entry.data)  # type: ignore[no-any-return]
        emit(self.observer, CacheMiss("cache", key))
        try:
            return await self._flight(key, loader, ttl, tags)  # type: ignore[no-any-return]
        except Exception:
            if entry is not None and now < entry.expires_at + self.stale_if_error:
                emit(self.observer, StaleServed("cache", key, "error"))
                return self.serializer.loads(entry.data)  # type: ignore[no-any-return]
            raise

    def _flight(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: Iterable[str],
    ) -> Awaitable[Any]:
        """Return the load of *key* in flight (starting one if none is), shielded for callers."""
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, loader, ttl, tags))
            self._flights[key] = task
            task.add_done_callback(self._landed(key))
        return asyncio.shield(task)

    def _landed(self, key: str) -> Callable[[asyncio.Task[Any]], None]:
        def landed(task: asyncio.Task[Any]) -> None:
            if self._flights.get(key) is task:
                del self._flights[key]
            if not task.cancelled():
                task.exception()  # retrieved: every waiter got it already, or none wants it

        return landed

    def _background(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: Iterable[str],
        reason: str,
    ) -> None:
        if key in self._flights:
            return  # one refresher per key
        emit(self.observer, CacheRefreshed("cache", key, reason))
        self._flight(key, loader, ttl, tags)

    async def _load(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: Iterable[str],
    ) -> Any:
        started = self.clock.monotonic()
        value = await loader()
        await self._put(key, value, ttl, tags, delta=self.clock.monotonic() - started)
        return value

    async def _put(
        self, key: str, value: Any, ttl: float | None, tags: Iterable[str], *, delta: float
    ) -> None:
        if value is None:
            if self.negative_ttl is None:
                return  # "not found" is not cached unless asked for
            ttl = self.negative_ttl
        lifetime = jittered_ttl(self.ttl if ttl is None else ttl, self.jitter, self.rng)
        now = self.clock.time()
        expires_at = now + lifetime
        stale = max(self.stale_while_revalidate, self.stale_if_error)
        entry = Entry(self.serializer.dumps(value), expires_at, expires_at + stale, delta)
        await self._store.set(key, entry, tags, now)

    def __repr__(self) -> str:
        return f"Cache({self._store!r}, ttl={self.ttl!r})"
