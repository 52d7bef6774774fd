"""What a cache entry holds, the pure decisions made on it, and the lookup they drive.

An entry is fresh until ``expires_at``; after that it may still be served *stale* until
``stale_until`` (stale-while-revalidate and stale-if-error, RFC 5861's meaning), then it
is gone. It carries ``delta``, how long its value took to compute, for the probabilistic
early refresh of Vattani, Chierichetti and Lowenstein ("Optimal Probabilistic Cache
Stampede Prevention", VLDB 2015, "XFetch"): a read at ``now`` refreshes early when

    now - delta * beta * ln(u) >= expires_at,     u uniform in (0, 1]

so the closer to expiry, and the slower the value is to compute, the likelier a refresh.

Logic once, I/O twice: :meth:`Cache.get_or_load <resilient.Cache.get_or_load>` (asyncio)
and :meth:`Cache.get_or_load_sync <resilient.Cache.get_or_load_sync>` (threads) run the
same two generators, :func:`lookup` and :func:`load`, as httpx runs its ``auth_flow``.
They yield what they need (:class:`Need`: read the entry, start a refresh, wait for the
key's load, stamp the tags, call the loader; :class:`Write`: store an entry) and are sent
the answer, or thrown the exception it raised. Everything else is decided here: what is a
hit, when to refresh early, when stale values serve, what a load stores, which events say
so. A driver owns only the I/O and the single flight: one load per key at a time, whose
outcome every caller waiting for it gets.
"""

from __future__ import annotations

import enum
import json
import math
import random
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from resilient.clock import Clock
from resilient.errors import BackendError, ConfigurationError
from resilient.events import (
    BackendFailed,
    CacheEntryInvalid,
    CacheHit,
    CacheMiss,
    CacheRefreshed,
    Observer,
    StaleServed,
    emit,
)

__all__ = [
    "MISSING",
    "Entry",
    "Flow",
    "InvalidEntry",
    "JSONSerializer",
    "Need",
    "Serializer",
    "Settings",
    "Write",
    "jittered_ttl",
    "load",
    "lookup",
    "new_entry",
    "should_refresh_early",
]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
"""What :meth:`Cache.get <resilient.Cache.get>` returns for a key it does not hold."""


@dataclass(slots=True)
class Entry:
    """A cached value (serialised), its deadlines and what it took to compute."""

    data: bytes
    expires_at: float
    stale_until: float
    delta: float = 0.0
    tags: dict[str, Any] = field(default_factory=dict)
    """The versions of its tags it was stamped with (kept by the memory store)."""

    def fresh(self, now: float) -> bool:
        """Whether the entry may be served as is."""
        return now < self.expires_at

    def servable(self, now: float) -> bool:
        """Whether the entry may be served at all, if only as stale."""
        return now < self.stale_until


class InvalidEntry(Exception):
    """Raised by a store for a value it holds under a key but cannot read as an entry.

    ``reason`` is ``"header"`` (not an entry of this cache) or ``"body"`` (the serializer
    cannot read its value). :class:`~resilient.Cache` treats it as a miss: the loader runs,
    the entry is overwritten, and a :class:`~resilient.events.CacheEntryInvalid` says so.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def should_refresh_early(entry: Entry, now: float, beta: float, rng: random.Random) -> bool:
    """XFetch: whether a read of a fresh *entry* at *now* should recompute it early."""
    if beta <= 0 or entry.delta <= 0:
        return False
    u = 1.0 - rng.random()  # in (0, 1]: log(0) is not a number
    return now - entry.delta * beta * math.log(u) >= entry.expires_at


def jittered_ttl(ttl: float, jitter: float, rng: random.Random) -> float:
    """Shorten *ttl* by a random share of up to *jitter*: keys set together expire apart."""
    if jitter <= 0:
        return ttl
    return ttl * (1.0 - jitter * rng.random())


class Serializer(Protocol):
    """Turns values into bytes for a store and back. Never unpickle from a shared store."""

    def dumps(self, value: Any, /) -> bytes:
        """Return *value* as bytes."""
        ...

    def loads(self, data: bytes, /) -> Any:
        """Return the value *data* holds."""
        ...


class JSONSerializer:
    """JSON, compact: the default. Values must be JSON-serialisable."""

    __slots__ = ()

    def dumps(self, value: Any, /) -> bytes:
        """Return *value* as compact JSON bytes."""
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            msg = f"cannot cache a {type(value).__name__} as JSON: {exc}; pass a serializer"
            raise TypeError(msg) from exc

    def loads(self, data: bytes, /) -> Any:
        """Return the value of JSON *data*; :class:`ValueError` if it is not what ``dumps`` writes.

        Strict: UTF-8 only (never guessed from the bytes) and no ``NaN`` or ``Infinity``,
        which ``dumps`` refuses to write.
        """
        return json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constant)

    def __repr__(self) -> str:
        return "JSONSerializer()"


def _no_constant(name: str) -> Any:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def validate_seconds(name: str, value: float, *, allow_zero: bool = True) -> float:
    """Return *value* as a float if it is a finite number of seconds (> 0 unless allowed 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        msg = f"{name} must be a finite number of seconds, not {value!r}"
        raise ConfigurationError(msg)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        msg = f"{name} must be {bound}, not {value!r}"
        raise ConfigurationError(msg)
    return float(value)


# --- the lookup, once for both drivers --------------------------------------------------


class Settings(Protocol):
    """What the lookup reads from its cache (:class:`~resilient.Cache` is one)."""

    ttl: float
    stale_while_revalidate: float
    stale_if_error: float
    beta: float
    jitter: float
    negative_ttl: float | None
    serializer: Serializer
    clock: Clock
    rng: random.Random
    observer: Observer | None


class Need(enum.Enum):
    """What a lookup or a load needs its driver to do before it can go on."""

    READ = "read"
    """Send back the key's servable entry, or ``None``; throw ``InvalidEntry`` for an entry
    the store cannot read, ``BackendError`` when the store fails."""

    FORGET = "forget"
    """The key's entry cannot be read: forget any copy kept in process. Send ``None``."""

    REFRESH = "refresh"
    """Start a load of the key in the background unless one runs (or the driver has no
    room for another); send back whether one was started."""

    LOAD = "load"
    """Wait for the key's load, starting one if none runs; send back its value or throw
    its exception."""

    STAMP = "stamp"
    """Send back the current versions of the load's tags, taken before the loader runs (a
    tag invalidated while it runs then invalidates what it stores); throw
    ``BackendError`` when the store fails."""

    CALL = "call"
    """Call the loader; send back its value or throw its exception."""


@dataclass(frozen=True, slots=True)
class Write:
    """Store *entry* (``None``: nothing to store, but a lock to free) with its tags' *stamps*.

    Send ``None``; throw ``BackendError`` when the store fails.
    """

    entry: Entry | None
    stamps: dict[str, Any] | None


Flow: TypeAlias = Generator[Need | Write, Any, Any]
"""A lookup or a load in progress: yields what it needs, is sent (or thrown) the answer."""


def lookup(cache: Settings, key: str, now: float) -> Flow:
    """Return *key*'s value at *now*: fresh, stale (refreshing), or from the key's load.

    A fresh value may start an early refresh (XFetch); an expired one is served for
    ``stale_while_revalidate`` seconds while one refresh runs; a miss waits for the load,
    and if the load fails, an expired value is served for ``stale_if_error`` seconds. An
    entry that cannot be read is a miss, never served stale. A failing store is a miss
    too: the value is loaded directly. The driver reads the entry at the same *now*.
    """
    entry: Entry | None
    try:
        entry = yield Need.READ
    except BackendError as exc:
        emit(cache.observer, BackendFailed("cache", "get", exc, "loaded directly"))
        entry = None
    except InvalidEntry as exc:
        yield from _unreadable(cache, key, exc)
        entry = None
    value: Any = None
    if entry is not None:
        try:
            value = cache.serializer.loads(entry.data)
        except Exception as exc:  # any serializer's failure: another writer's bytes
            yield from _unreadable(cache, key, InvalidEntry("body", repr(exc)))
            entry = None
    if entry is not None:
        if entry.fresh(now):
            if should_refresh_early(entry, now, cache.beta, cache.rng):
                yield from _refresh(cache, key, "early")
            emit(cache.observer, CacheHit("cache", key))
            return value
        if now < entry.expires_at + cache.stale_while_revalidate:
            yield from _refresh(cache, key, "stale")
            emit(cache.observer, StaleServed("cache", key, "revalidating"))
            return value
    emit(cache.observer, CacheMiss("cache", key))
    try:
        return (yield Need.LOAD)
    except Exception:
        if entry is not None and now < entry.expires_at + cache.stale_if_error:
            emit(cache.observer, StaleServed("cache", key, "error"))
            return value
        raise


def _unreadable(cache: Settings, key: str, error: InvalidEntry) -> Flow:
    yield Need.FORGET
    emit(cache.observer, CacheEntryInvalid("cache", key, error.reason))


def _refresh(cache: Settings, key: str, reason: str) -> Flow:
    if (yield Need.REFRESH):
        emit(cache.observer, CacheRefreshed("cache", key, reason))


def load(cache: Settings, ttl: float | None, *, tagged: bool) -> Flow:
    """Call the loader and store what it returns; return the value.

    With *tagged*, the tags' versions are taken first, so a tag invalidated while the
    loader runs leaves the stored value invalid. The value is returned even when it
    cannot be stored (the store failed: reported); the loader's exception is raised.
    """
    stamps: dict[str, Any] | None = None
    failure: BackendError | None = None
    if tagged:
        try:
            stamps = yield Need.STAMP
        except BackendError as exc:
            failure = exc
    started = cache.clock.monotonic()
    value = yield Need.CALL
    entry = new_entry(cache, value, ttl, delta=cache.clock.monotonic() - started)
    try:
        # Unstamped, a tagged value would outlive its tags' invalidation: not stored (the
        # write still frees what the load holds).
        yield Write(entry if failure is None else None, stamps)
    except BackendError as exc:
        failure = failure or exc
    if failure is not None and entry is not None:
        emit(cache.observer, BackendFailed("cache", "set", failure, "value not stored"))
    return value


def new_entry(cache: Settings, value: Any, ttl: float | None, *, delta: float) -> Entry | None:
    """Return the entry that stores *value* now, or ``None`` (a ``None`` not to be cached)."""
    if value is None:
        if cache.negative_ttl is None:
            return None  # "not found" is not cached unless asked for
        ttl = cache.negative_ttl
    lifetime = jittered_ttl(cache.ttl if ttl is None else ttl, cache.jitter, cache.rng)
    expires_at = cache.clock.time() + lifetime
    stale = max(cache.stale_while_revalidate, cache.stale_if_error)
    return Entry(cache.serializer.dumps(value), expires_at, expires_at + stale, delta)
