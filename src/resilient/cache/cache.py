"""``Cache``: cache-aside that loads each key once, however many callers miss it at once."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from resilient.backends.memory import MemoryBackend
from resilient.backends.redis import RedisBackend
from resilient.cache.core import (
    MISSING,
    Entry,
    InvalidEntry,
    JSONSerializer,
    Need,
    Serializer,
    Write,
    load,
    lookup,
    new_entry,
    validate_seconds,
)
from resilient.cache.memory import MemoryCacheStore
from resilient.clock import Clock, SystemClock
from resilient.errors import BackendError, ConfigurationError
from resilient.events import (
    BackendFailed,
    CacheEntryInvalid,
    CacheLockWait,
    LoggingObserver,
    Observer,
    emit,
)

if TYPE_CHECKING:
    from resilient.cache.l1 import L1
    from resilient.cache.redis import RedisCacheStore

__all__ = ["Cache"]

_T = TypeVar("_T")
_DEFAULT_OBSERVER = LoggingObserver()
_SYNC_REFRESHES = 8  # background refresh threads at once, per cache
# The lookup's needs, as module constants: the drivers compare them on every read.
_READ, _LOAD, _REFRESH, _FORGET = Need.READ, Need.LOAD, Need.REFRESH, Need.FORGET
_Tags: TypeAlias = tuple[str, ...]


class _LoaderFailed(Exception):
    """Carries the loader's own exception past the backend-failure fallback."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Flight:
    """One load of a key in a thread: the others wait for its outcome."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def result(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def _unexpected(need: object) -> RuntimeError:
    return RuntimeError(f"the cache's driver cannot do {need!r}")


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
    *serializer* (JSON by default; nothing is ever unpickled). An entry that cannot be
    read (another writer's bytes, a truncated value, a header of another version) is a
    miss: it is never served, even stale, the loader runs and overwrites it, and a
    :class:`~resilient.events.CacheEntryInvalid` event says so.

    A value stored with *tags* is gone once any of them is invalidated
    (:meth:`invalidate_tags`). A loaded value is stamped with its tags' versions before
    its loader runs, so an invalidation while it runs invalidates what it stores too.

    :meth:`get_or_load_sync` does the same lookup for plain functions, in threads (on the
    memory backend): both run one core, :mod:`resilient.cache.core`.

    On a :class:`~resilient.RedisBackend`, one process loads a key for all of them: the
    others wait, up to *max_wait* seconds, to be woken when the value is written (no
    polling), then load it themselves. The loader holds a lock for *lock_lease* seconds,
    renewed while it runs, so a process that dies while loading is replaced after its
    lease. If Redis fails, each process loads on its own (still once per process at a
    time) and an event says so. With *l1* > 0, up to *l1* recently read entries are also
    kept in process, each for at most *l1_ttl* seconds, and dropped when another instance
    writes, deletes or invalidates them (through Redis pub/sub; see
    :mod:`resilient.cache.l1`).

    :meth:`delete` and :meth:`invalidate_tags` never fail silently: when the backend
    fails, they return ``False`` (or raise :class:`~resilient.errors.BackendError` with
    ``raise_on_error=True``), a :class:`~resilient.events.BackendFailed` event says so,
    and the cache remembers the invalidation (up to *max_pending_invalidations* of them)
    and does it first, before anything else it asks the backend, once the backend answers
    again. Until then, this cache reads nothing from the backend, so it never serves a
    value it was told to forget; other processes may, until it is done.

    >>> cache = Cache(ttl=600, stale_while_revalidate=30)
    >>> async def product(product_id: int) -> dict[str, object]:
    ...     return await cache.get_or_load(f"product:{product_id}", lambda: load(product_id))
    """

    __slots__ = (
        "_flights",
        "_l1",
        "_local",
        "_lookups",
        "_pending",
        "_pending_serial",
        "_refreshers",
        "_shared",
        "_store",
        "_sync_flights",
        "_sync_lock",
        "beta",
        "clock",
        "jitter",
        "lock_lease",
        "max_pending_invalidations",
        "max_wait",
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
        backend: MemoryBackend | RedisBackend | None = None,
        *,
        ttl: float = 600.0,
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        beta: float = 1.0,
        jitter: float = 0.1,
        negative_ttl: float | None = None,
        serializer: Serializer | None = None,
        lock_lease: float = 10.0,
        max_wait: float = 5.0,
        l1: int = 0,
        l1_ttl: float = 5.0,
        max_pending_invalidations: int = 10_000,
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
        self.lock_lease = validate_seconds("lock_lease", lock_lease, allow_zero=False)
        self.max_wait = validate_seconds("max_wait", max_wait)
        if backend is None:
            backend = MemoryBackend()
        self._shared: RedisCacheStore | None = None
        self._local: MemoryCacheStore | None = None
        if isinstance(backend, RedisBackend):
            from resilient.cache.redis import RedisCacheStore  # noqa: PLC0415

            self._shared = backend.store("cache", RedisCacheStore)
            self._store: MemoryCacheStore | RedisCacheStore = self._shared
        elif isinstance(backend, MemoryBackend):
            self._store = self._local = backend.store("cache", MemoryCacheStore)
        else:
            msg = f"a cache needs a MemoryBackend or a RedisBackend, not {backend!r}"
            raise ConfigurationError(msg)
        self._flights: dict[str, asyncio.Task[Any]] = {}
        self._sync_flights: dict[str, _Flight] = {}
        self._sync_lock = threading.Lock()
        self._refreshers = threading.BoundedSemaphore(_SYNC_REFRESHES)
        if isinstance(l1, bool) or not isinstance(l1, int) or l1 < 0:
            msg = f"l1 must be a number of entries >= 0, not {l1!r}"
            raise ConfigurationError(msg)
        self._l1: L1 | None = None
        if l1:
            if not isinstance(backend, RedisBackend):
                msg = "an in-process tier (l1) sits in front of a RedisBackend only"
                raise ConfigurationError(msg)
            from resilient.cache.l1 import L1  # noqa: PLC0415

            self._l1 = L1(
                backend, l1, validate_seconds("l1_ttl", l1_ttl, allow_zero=False), observer
            )
        self._lookups: dict[str, asyncio.Task[Any]] = {}
        if (
            isinstance(max_pending_invalidations, bool)
            or not isinstance(max_pending_invalidations, int)
            or max_pending_invalidations < 1
        ):
            msg = (
                "max_pending_invalidations must be a number of invalidations >= 1, "
                f"not {max_pending_invalidations!r}"
            )
            raise ConfigurationError(msg)
        self.max_pending_invalidations = max_pending_invalidations
        # Invalidations the backend failed, oldest first: (kind, name) -> serial number.
        self._pending: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._pending_serial = 0

    # --- what it holds ----------------------------------------------------------------

    @property
    def store(self) -> MemoryCacheStore | RedisCacheStore:
        """The store the entries live in: the backend's cache store."""
        return self._store

    @property
    def l1(self) -> L1 | None:
        """The in-process tier in front of Redis (``None`` unless made with ``l1=``)."""
        return self._l1

    @property
    def in_flight(self) -> int:
        """How many loads (and, on Redis, shared lookups) this process has under way.

        A key's state goes with its load: an idle cache holds none, however many keys it
        has loaded.
        """
        return len(self._lookups) + len(self._flights) + len(self._sync_flights)

    # --- plain operations ---------------------------------------------------------------

    async def get(self, key: str) -> Any:
        """Return *key*'s fresh value, or :data:`~resilient.cache.MISSING`.

        An entry that cannot be read is missing (and a ``CacheEntryInvalid`` says so).
        """
        try:
            entry = await self._entry_of(key, self.clock.time())
        except InvalidEntry as exc:
            self._unreadable(key, exc)
            return MISSING
        if entry is None or not entry.fresh(self.clock.time()):
            return MISSING
        try:
            return self.serializer.loads(entry.data)
        except Exception as exc:  # any serializer's failure: another writer's bytes
            self._unreadable(key, InvalidEntry("body", repr(exc)))
            return MISSING

    def _unreadable(self, key: str, error: InvalidEntry) -> None:
        """Report an unreadable entry of *key*; never serve it again from this process."""
        self._forget(key)
        emit(self.observer, CacheEntryInvalid("cache", key, error.reason))

    def _forget(self, key: str) -> None:
        if self._l1 is not None:
            self._l1.drop(key)

    async def _entry_of(self, key: str, now: float, tags: _Tags = ()) -> Entry | None:
        l1 = self._l1
        if l1 is not None:
            entry = l1.get(key, now)
            if entry is not None:
                return entry
        if self._pending:
            await self._settle_pending()
        entry = await self._store.get(key, now, tags)
        if l1 is not None and entry is not None:
            l1.put(key, entry, now)
        return entry

    async def _published(self, kind: str, name: str) -> None:
        """Tell the other instances' in-process tiers to drop *name*."""
        l1 = self._l1
        if l1 is None:
            return
        if kind == "k":
            l1.drop(name)
        else:
            l1.clear()
        try:
            await l1.publish(kind, name)
        except BackendError as exc:
            emit(self.observer, BackendFailed("cache", "publish", exc, "not published"))

    async def set(
        self, key: str, value: Any, *, ttl: float | None = None, tags: Iterable[str] = ()
    ) -> None:
        """Store *value* under *key* for *ttl* seconds (default: the cache's), with *tags*."""
        entry = new_entry(self, value, ttl, delta=0.0)
        if entry is not None:
            stamps = await self._stamp(tuple(tags), entry.stale_until - self.clock.time())
            await self._write(key, entry, stamps)

    async def _stamp(self, tags: tuple[str, ...], lifetime: float) -> dict[str, Any]:
        """Return the current versions of *tags*, to store a value with."""
        if not tags:
            return {}
        if self._pending:
            await self._settle_pending()
        return await self._store.stamp(tags, lifetime)

    def _lifetime(self, ttl: float | None) -> float:
        """Return the longest a value loaded now may live: its tags' versions outlive it."""
        fresh = max(self.ttl if ttl is None else ttl, self.negative_ttl or 0.0)
        return fresh + max(self.stale_while_revalidate, self.stale_if_error) + self.lock_lease

    async def _write(self, key: str, entry: Entry | None, stamps: dict[str, Any] | None) -> None:
        if entry is None:
            return
        if self._pending:
            await self._settle_pending()
        now = self.clock.time()
        await self._store.set(key, entry, stamps or {}, now)
        await self._published("k", key)
        if self._l1 is not None:
            self._l1.put(key, entry, now)

    async def delete(self, key: str, *, raise_on_error: bool = False) -> bool:
        """Forget *key*; return whether the backend did (``False``: it will, when it can).

        When the backend fails, a ``BackendFailed`` event says so, the delete is
        remembered and done before this cache next reaches the backend (which it reads
        nothing from until then), and ``False`` is returned, or, with *raise_on_error*,
        :class:`~resilient.errors.BackendError` raised.
        """
        return await self._invalidate("k", [key], "delete", raise_on_error=raise_on_error)

    async def invalidate_tags(self, tags: Iterable[str], *, raise_on_error: bool = False) -> bool:
        """Forget every value stored with any of *tags*, at once; return whether the backend did.

        On Redis, every tag moves on in one atomic script, however many values they hold.
        A failure is handled as for :meth:`delete`: reported, remembered, done first once
        the backend answers again.
        """
        names = list(dict.fromkeys(tags))
        return await self._invalidate("t", names, "invalidate", raise_on_error=raise_on_error)

    @property
    def pending_invalidations(self) -> int:
        """How many failed deletes and tag invalidations wait for the backend to be back."""
        return len(self._pending)

    async def _invalidate(
        self, kind: str, names: list[str], operation: str, *, raise_on_error: bool
    ) -> bool:
        try:
            if self._pending:
                await self._settle_pending()
            if names:
                await self._invalidate_now(kind, names)
        except BackendError as exc:
            emit(self.observer, BackendFailed("cache", operation, exc, "retried later"))
            for name in names:
                self._remember((kind, name), exc)
            if raise_on_error:
                raise
            return False
        return True

    async def _invalidate_now(self, kind: str, names: list[str]) -> None:
        if kind == "k":
            for name in names:
                await self._store.delete(name)
        else:
            await self._store.invalidate_tags(names)
        for name in names:
            await self._published(kind, name)

    def _remember(self, item: tuple[str, str], error: BackendError) -> None:
        """Keep a failed invalidation for later; at the bound, forget the oldest (reported)."""
        l1 = self._l1
        if l1 is not None:  # this process stops answering for it at once
            if item[0] == "k":
                l1.drop(item[1])
            else:
                l1.clear()
        self._pending_serial += 1
        self._pending[item] = self._pending_serial
        self._pending.move_to_end(item)
        if len(self._pending) > self.max_pending_invalidations:
            (kind, _), _ = self._pending.popitem(last=False)
            operation = "delete" if kind == "k" else "invalidate"
            outcome = "forgotten: too many pending invalidations"
            emit(self.observer, BackendFailed("cache", operation, error, outcome))

    async def _settle_pending(self) -> None:
        """Do the remembered invalidations, oldest first; raise ``BackendError`` if one fails.

        Every read and write of the backend comes after this, so this process never
        reads a value it was told to forget.
        """
        pending = self._pending
        for _ in range(len(pending)):  # bounded: others may remember more meanwhile
            if not pending:
                return
            item, serial = next(iter(pending.items()))
            await self._invalidate_now(item[0], [item[1]])
            if pending.get(item) == serial:  # not failed again meanwhile
                del pending[item]

    # --- cache-aside, asyncio -----------------------------------------------------------

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[_T]],
        *,
        ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> _T:
        """Return *key*'s value, loading it with *loader* once for all concurrent misses."""
        if self._shared is None:
            return await self._look_up(key, loader, ttl, tags)  # type: ignore[no-any-return]
        tags = tuple(tags)  # read twice: by the lookup's read, then by its load
        # On Redis, concurrent callers of a key share the whole lookup (one read, then the
        # load if needed): they wait once, not once per step.
        task = self._lookups.get(key)
        # A task that is done but not yet forgotten (its callback runs a loop step later)
        # answered an earlier call: this one starts afresh.
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._look_up(key, loader, ttl, tags))
            self._lookups[key] = task
            task.add_done_callback(self._lookup_done(key))
        return await asyncio.shield(task)

    async def _look_up(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: Iterable[str],
    ) -> Any:
        """Drive :func:`~resilient.cache.core.lookup` on the event loop."""
        now = self.clock.time()
        flow = lookup(self, key, now)
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                need = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value
            reply = error = None
            try:
                if need is _READ:
                    local = self._local  # the memory store answers without waiting
                    if local is not None:
                        reply = local.get_now(key, now)
                    else:
                        reply = await self._entry_of(key, now, tuple(tags))
                elif need is _LOAD:
                    reply = await self._flight(key, loader, ttl, tags)
                elif need is _REFRESH:
                    reply = self._background(key, loader, ttl, tags)
                elif need is _FORGET:
                    self._forget(key)
                else:
                    raise _unexpected(need)
            except Exception as exc:  # thrown into the lookup, which decides
                error = exc

    def _lookup_done(self, key: str) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            if self._lookups.get(key) is task:
                del self._lookups[key]
            if not task.cancelled():
                task.exception()

        return done

    def _flight(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: Iterable[str],
    ) -> Awaitable[Any]:
        """Return the load of *key* in flight (starting one if none is), shielded for callers."""
        task = self._flights.get(key)
        if task is None or task.done():  # done: an earlier load, its callback still pending
            task = self._take_off(key, loader, ttl, tags)
        return asyncio.shield(task)

    def _take_off(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: Iterable[str],
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(self._load(key, loader, ttl, tuple(tags)))
        self._flights[key] = task
        task.add_done_callback(self._landed(key))
        return task

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
    ) -> bool:
        flight = self._flights.get(key)
        if flight is not None and not flight.done():
            return False  # one refresher per key
        self._take_off(key, loader, ttl, tags)  # nobody waits: its outcome is retrieved
        return True

    async def _load(
        self, key: str, loader: Callable[[], Awaitable[Any]], ttl: float | None, tags: _Tags
    ) -> Any:
        if self._shared is not None:
            try:
                return await self._load_shared(self._shared, key, loader, ttl, tags)
            except _LoaderFailed as failed:
                raise failed.error from failed.error.__cause__
            except BackendError as exc:
                emit(self.observer, BackendFailed("cache", "load", exc, "loaded directly"))
        return await self._drive_load(key, loader, ttl, tags, self._write)

    async def _drive_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: _Tags,
        write: Callable[[str, Entry | None, dict[str, Any] | None], Awaitable[None]],
    ) -> Any:
        """Drive :func:`~resilient.cache.core.load` on the event loop, storing with *write*."""
        flow = load(self, ttl, tagged=bool(tags))
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                need = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value
            reply = error = None
            try:
                if need is Need.CALL:
                    reply = await loader()
                elif isinstance(need, Write):
                    await write(key, need.entry, need.stamps)
                elif need is Need.STAMP:
                    reply = await self._stamp(tags, self._lifetime(ttl))
                else:
                    raise _unexpected(need)
            except Exception as exc:  # thrown into the load, which decides
                error = exc

    async def _load_shared(
        self,
        store: RedisCacheStore,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: _Tags,
    ) -> Any:
        """Load *key* once across processes: claim the lock, or wait to be woken."""
        loop = asyncio.get_running_loop()
        token = secrets.token_hex(8)
        lease_ms = math.ceil(self.lock_lease * 1000)
        deadline = loop.time() + self.max_wait
        over_value = False
        if self._pending:
            await self._settle_pending()
        while True:
            try:
                kind, found = await store.claim(
                    key, self.clock.time(), token, lease_ms, over_value=over_value
                )
            except InvalidEntry as exc:
                self._unreadable(key, exc)
                over_value = True  # claim the load over it, as for a miss
                continue
            over_value = False
            if kind == "v":
                try:
                    return self.serializer.loads(found.data)
                except Exception as exc:  # any serializer's failure: another writer's bytes
                    self._unreadable(key, InvalidEntry("body", repr(exc)))
                    over_value = True
                    continue
            if kind == "o":
                return await self._load_owned(store, key, token, loader=loader, ttl=ttl, tags=tags)
            left = deadline - loop.time()
            if left <= 0:  # reported by the caller, which then loads on its own
                msg = f"another process's load of {key!r} took longer than max_wait"
                raise BackendError(msg)
            lock_left = (found or lease_ms) / 1000
            wait = min(left, lock_left + 0.05)
            emit(self.observer, CacheLockWait("cache", key, wait))
            await store.wait(key, wait)

    async def _load_owned(
        self,
        store: RedisCacheStore,
        key: str,
        token: str,
        *,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | None,
        tags: _Tags,
    ) -> Any:
        async def fill(key: str, entry: Entry | None, stamps: dict[str, Any] | None) -> None:
            now = self.clock.time()
            await store.fill(key, token, entry, stamps or {}, now)
            if entry is not None:
                await self._published("k", key)
                if self._l1 is not None:
                    self._l1.put(key, entry, now)

        renewing = asyncio.get_running_loop().create_task(self._renew(store, key, token))
        try:
            # The load stores what it may (or frees the lock) itself: what escapes it is
            # the loader's own exception.
            return await self._drive_load(key, loader, ttl, tags, fill)
        except BaseException as exc:
            with contextlib.suppress(BackendError):  # else the lock expires with its lease
                await asyncio.shield(store.fill(key, token, None, {}, self.clock.time()))
            if isinstance(exc, Exception):
                raise _LoaderFailed(exc) from exc
            raise
        finally:
            renewing.cancel()

    async def _renew(self, store: RedisCacheStore, key: str, token: str) -> None:
        lease_ms = math.ceil(self.lock_lease * 1000)
        while True:
            await asyncio.sleep(self.lock_lease / 3)
            try:
                if not await store.extend(key, token, lease_ms):
                    return
            except BackendError:
                continue

    # --- cache-aside, threads -----------------------------------------------------------

    def get_or_load_sync(
        self,
        key: str,
        loader: Callable[[], _T],
        *,
        ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> _T:
        """Do :meth:`get_or_load` for plain functions and threads (memory backend only).

        The same lookup as :meth:`get_or_load`, with threads for tasks: concurrent misses
        on a key in several threads share one loader call, whose value (or exception)
        every one of them gets; a value is refreshed early, or served stale while it is
        refreshed, in a background thread (one per key at a time, and at most
        ``8`` at once per cache: past that, the value is served and a later read
        refreshes it); stale values are served on error for ``stale_if_error``.
        """
        store = self._store
        if not isinstance(store, MemoryCacheStore):
            msg = "get_or_load_sync and @cached on a def need the memory backend"
            raise ConfigurationError(msg)
        now = self.clock.time()
        flow = lookup(self, key, now)
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                need = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            reply = error = None
            try:
                if need is _READ:
                    reply = store.get_now(key, now)
                elif need is _LOAD:
                    reply = self._flight_sync(store, key, loader, ttl, tags)
                elif need is _REFRESH:
                    reply = self._refresh_sync(store, key, loader, ttl, tags)
                elif need is not _FORGET:  # nothing kept in process but the store
                    raise _unexpected(need)
            except Exception as exc:  # thrown into the lookup, which decides
                error = exc

    def _flight_sync(
        self,
        store: MemoryCacheStore,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None,
        tags: Iterable[str],
    ) -> Any:
        """Wait for the load of *key* in flight, or load it in this thread if none is."""
        with self._sync_lock:
            flight = self._sync_flights.get(key)
            owner = flight is None
            if flight is None:
                flight = self._sync_flights[key] = _Flight()
        if owner:
            self._fly(flight, store=store, key=key, loader=loader, ttl=ttl, tags=tuple(tags))
        return flight.result()

    def _refresh_sync(
        self,
        store: MemoryCacheStore,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None,
        tags: Iterable[str],
    ) -> bool:
        """Start loading *key* in a background thread, unless one loads it or none is free."""
        with self._sync_lock:
            if key in self._sync_flights or not self._refreshers.acquire(blocking=False):
                return False
            flight = self._sync_flights[key] = _Flight()
        thread = threading.Thread(
            target=self._refresh_in_thread,
            args=(flight,),
            kwargs={"store": store, "key": key, "loader": loader, "ttl": ttl, "tags": tuple(tags)},
            name=f"resilient-cache-refresh:{key}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: the next read tries again
            self._refreshers.release()
            self._landed_sync(key, flight, None, exc)
            return False
        return True

    def _refresh_in_thread(self, flight: _Flight, **load: Any) -> None:
        try:
            self._fly(flight, **load)
        finally:
            self._refreshers.release()

    def _fly(
        self,
        flight: _Flight,
        *,
        store: MemoryCacheStore,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None,
        tags: _Tags,
    ) -> None:
        """Drive :func:`~resilient.cache.core.load` in this thread; land *flight* with it."""
        flow = load(self, ttl, tagged=bool(tags))
        reply: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    need = flow.send(reply) if error is None else flow.throw(error)
                except StopIteration as done:
                    value = done.value
                    break
                reply = error = None
                try:
                    if need is Need.CALL:
                        reply = loader()
                    elif isinstance(need, Write):
                        if need.entry is not None:
                            store.set_now(key, need.entry, need.stamps or {}, self.clock.time())
                    elif need is Need.STAMP:
                        reply = store.stamp_now(tags)
                    else:
                        raise _unexpected(need)
                except Exception as exc:  # thrown into the load, which decides
                    error = exc
        except BaseException as exc:  # every waiter gets it, whatever it is
            self._landed_sync(key, flight, None, exc)
        else:
            self._landed_sync(key, flight, value, None)

    def _landed_sync(
        self, key: str, flight: _Flight, value: Any, error: BaseException | None
    ) -> None:
        flight.value, flight.error = value, error
        with self._sync_lock:
            if self._sync_flights.get(key) is flight:
                del self._sync_flights[key]
        flight.done.set()

    async def aclose(self) -> None:
        """Stop the in-process tier's subscription, if there is one."""
        if self._l1 is not None:
            await self._l1.aclose()

    def __repr__(self) -> str:
        return f"Cache({self._store!r}, ttl={self.ttl!r})"
