"""The cache store of :class:`~resilient.RedisBackend`: values, load locks and wake-ups.

A value lives under ``prefix:cache:{digest}:v`` as ``v1|expires_ms|stale_ms|delta_ms|data``
(its key expires with its stale bound). Loading is guarded across processes by a lock per
key (``claim.lua``: ``SET NX PX`` with an owner token, unless a fresh value is already
there). Waiters in other processes are counted, then block on a list (``BLPOP``) that
the owner fills with one token per waiter when it stores the value (``fill.lua``), so
nobody polls. A lock whose owner died expires with its lease, and the next claim takes
over. Tags are sets of keys, deleted with their members on invalidation.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterable
from typing import Any

from resilient.backends.redis import RedisBackend, Script
from resilient.cache.core import Entry, InvalidEntry
from resilient.errors import BackendError

__all__ = ["RedisCacheStore"]

_CLAIM = Script("resilient.cache.lua", "claim.lua")
_FILL = Script("resilient.cache.lua", "fill.lua")
_EXTEND = Script("resilient.cache.lua", "extend.lua")


def pack(entry: Entry) -> bytes:
    """Return the bytes stored for *entry*."""
    head = "v1|%d|%d|%d|" % (  # noqa: UP031 (bytes-like header, one format)
        math.floor(entry.expires_at * 1000),
        math.floor(entry.stale_until * 1000),
        math.floor(entry.delta * 1000),
    )
    return head.encode() + entry.data


def unpack(raw: bytes) -> Entry | None:
    """Return the entry *raw* holds, or ``None`` if it is not one (bad header)."""
    parts = raw.split(b"|", 4)
    if len(parts) != 5 or parts[0] != b"v1":
        return None
    try:
        expires, stale, delta = (int(p) / 1000 for p in parts[1:4])
    except ValueError:
        return None
    return Entry(parts[4], expires, stale, delta)


def _read(raw: Any) -> Entry:
    if isinstance(raw, str):  # a client that decodes: a cache needs bytes
        raw = raw.encode("utf-8", "surrogateescape")
    entry = unpack(bytes(raw))
    if entry is None:
        msg = f"not a cache entry: {bytes(raw[:16])!r}"
        raise InvalidEntry("header", msg)
    return entry


class RedisCacheStore:
    """Cache entries and load locks in Redis (standalone or Cluster)."""

    __slots__ = ("_backend",)

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend

    def keys(self, key: str) -> list[str]:
        """Return the value, lock, waiter-count and notify-list keys of *key* (one hash tag)."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        backend = self._backend
        return [backend.key("cache", digest, suffix) for suffix in ("v", "l", "w", "n")]

    def _tag_key(self, tag: str) -> str:
        digest = hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self._backend.key("cachetag", digest, "s")

    async def get(self, key: str, now: float) -> Entry | None:
        """Return *key*'s entry if it is still servable."""
        client = self._backend.client
        raw: Any = await self._backend.guard(
            "reading a cached value", client.get(self.keys(key)[0])
        )
        if raw is None:
            return None
        entry = _read(raw)
        return entry if entry.servable(now) else None

    async def set(self, key: str, entry: Entry, tags: Iterable[str], now: float) -> None:
        """Store *entry* under *key* (no lock involved), and file it under *tags*."""
        value_key = self.keys(key)[0]
        ttl_ms = max(1, math.ceil((entry.stale_until - now) * 1000))
        client = self._backend.client
        await self._backend.guard(
            "storing a cached value", client.set(value_key, pack(entry), px=ttl_ms)
        )
        await self._tag(value_key, tags)

    async def _tag(self, value_key: str, tags: Iterable[str]) -> None:
        client = self._backend.client
        for tag in tags:
            await self._backend.guard(
                "tagging a cached value", client.sadd(self._tag_key(tag), value_key)
            )

    async def delete(self, key: str) -> None:
        """Forget *key*."""
        client = self._backend.client
        await self._backend.guard("deleting a cached value", client.delete(self.keys(key)[0]))

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Delete every value filed under any of *tags* (key by key: they span slots)."""
        backend, client = self._backend, self._backend.client
        for tag in tags:
            tag_key = self._tag_key(tag)
            members = await backend.guard("reading a tag", client.smembers(tag_key))
            for member in members:
                await backend.guard("invalidating a tag", client.delete(member))
            await backend.guard("invalidating a tag", client.delete(tag_key))

    # --- loading across processes -------------------------------------------------------

    async def claim(
        self, key: str, now: float, token: str, lease_ms: int, *, over_value: bool = False
    ) -> tuple[str, Any]:
        """Claim the load of *key*: ``("v", entry)``, ``("o", None)`` or ``("w", ttl_ms)``.

        Raises :class:`~resilient.cache.core.InvalidEntry` when the value there looks fresh
        but is not an entry; claim again *over_value* to load over it.
        """
        reply = await self._backend.run_script(
            _CLAIM,
            self.keys(key),
            (math.floor(now * 1000), token, lease_ms, "1" if over_value else "0"),
        )
        kind = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if kind == "v":
            return kind, _read(reply[1])
        if kind == "w":
            return kind, int(reply[1])
        return kind, None

    async def fill(
        self, key: str, token: str, entry: Entry | None, tags: Iterable[str], now: float
    ) -> int:
        """Store *entry* (or nothing), free the lock, wake the waiters; return how many."""
        if entry is None:
            value, ttl_ms = b"", 0
        else:
            value, ttl_ms = pack(entry), max(1, math.ceil((entry.stale_until - now) * 1000))
        woken = await self._backend.run_script(_FILL, self.keys(key), (token, value, ttl_ms))
        if entry is not None:
            await self._tag(self.keys(key)[0], tags)
        return int(woken)

    async def extend(self, key: str, token: str, lease_ms: int) -> bool:
        """Renew the load lock's lease if *token* still holds it."""
        lock = self.keys(key)[1]
        return bool(await self._backend.run_script(_EXTEND, [lock], (token, lease_ms)))

    async def wait(self, key: str, seconds: float) -> bool:
        """Block until the owner wakes this waiter, or *seconds* pass; return whether woken."""
        notify = self.keys(key)[3]
        client = self._backend.client
        errors: tuple[type[BaseException], ...] = (TimeoutError, *self._backend.errors)
        try:
            async with asyncio.timeout(seconds + 1.0):
                reply = await client.blpop([notify], timeout=max(seconds, 0.01))
        except errors as exc:
            msg = f"Redis failed waiting for a cached value: {exc!r}"
            raise BackendError(msg) from exc
        return reply is not None

    def __repr__(self) -> str:
        return f"RedisCacheStore({self._backend!r})"
