"""What a cache entry holds, and the pure decisions made on it.

An entry is fresh until ``expires_at``; after that it may still be served *stale* until
``stale_until`` (stale-while-revalidate and stale-if-error, RFC 5861's meaning), then it
is gone. It carries ``delta``, how long its value took to compute, for the probabilistic
early refresh of Vattani, Chierichetti and Lowenstein ("Optimal Probabilistic Cache
Stampede Prevention", VLDB 2015, "XFetch"): a read at ``now`` refreshes early when

    now - delta * beta * ln(u) >= expires_at,     u uniform in (0, 1]

so the closer to expiry, and the slower the value is to compute, the likelier a refresh.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from resilient.errors import ConfigurationError

__all__ = [
    "MISSING",
    "Entry",
    "InvalidEntry",
    "JSONSerializer",
    "Serializer",
    "jittered_ttl",
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
    tags: dict[str, int] = field(default_factory=dict)

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
