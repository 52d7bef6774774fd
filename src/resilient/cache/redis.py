"""The cache store of :class:`~resilient.RedisBackend`: values, tags, load locks and wake-ups.

Every operation is one Lua script (``cache/lua/``), run in one round trip:

* a value lives under ``prefix:cache:{digest}:v`` as
  ``v2|expires_ms|stale_ms|delta_ms|stamps|data`` (its key expires with its stale bound);
  ``get.lua`` reads it, ``set.lua`` writes it, ``delete.lua`` forgets it;
* tags are versions, one key per tag, every one under the hash tag ``{tags}``
  (``prefix:cache:{tags}:digest``), so one script reaches them all: ``invalidate_tags``
  gives each tag a new version in one atomic call (``invalidate.lua``), whatever the number
  of tags and values. A value is stored with the versions its tags had before it was
  loaded (``stamp.lua``; its *stamps*), and a read that finds a tag moved on, or its
  version gone, treats the value as missing. On a standalone server the read checks the
  versions in the same script. On Redis Cluster, where the versions live in another slot,
  they are read by a second script on the tags' slot (``versions.lua``): at the same time
  as the value when the caller names the tags it expects (``get_or_load`` does), after it
  when the value turns out to have tags (``get`` does); a value without tags costs none;
* loading is guarded across processes by a lock per key (``claim.lua``: ``SET NX PX``
  with an owner token, unless a fresh value is already there). Waiters in other processes
  are counted, then block on a list (``BLPOP``) that the owner fills with one token per
  waiter when it stores the value (``fill.lua``), so nobody polls. A lock whose owner died
  expires with its lease, and the next claim takes over.

Each version key lives at least as long as the values stored with it, and a version that
expires takes its values along: nothing grows forever, and nothing invalidated comes back.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
from collections.abc import Iterable
from typing import Any

from resilient.backends.redis import RedisBackend, Script
from resilient.cache.core import Entry, InvalidEntry
from resilient.errors import BackendError

__all__ = ["RedisCacheStore"]

_PACKAGE = "resilient.cache.lua"
_GET = Script(_PACKAGE, "get.lua")
_SET = Script(_PACKAGE, "set.lua")
_DELETE = Script(_PACKAGE, "delete.lua")
_STAMP = Script(_PACKAGE, "stamp.lua")
_INVALIDATE = Script(_PACKAGE, "invalidate.lua")
_VERSIONS = Script(_PACKAGE, "versions.lua")
_CLAIM = Script(_PACKAGE, "claim.lua")
_FILL = Script(_PACKAGE, "fill.lua")
_EXTEND = Script(_PACKAGE, "extend.lua")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def pack(entry: Entry, stamps: dict[str, Any] | None = None) -> bytes:
    """Return the bytes stored for *entry*, with its tags' *stamps* (digest -> version)."""
    tags = ",".join(f"{tag}:{version}" for tag, version in (stamps or {}).items())
    head = "v2|%d|%d|%d|%s|" % (  # noqa: UP031 (bytes-like header, one format)
        math.floor(entry.expires_at * 1000),
        math.floor(entry.stale_until * 1000),
        math.floor(entry.delta * 1000),
        tags,
    )
    return head.encode() + entry.data


def unpack(raw: bytes) -> tuple[Entry, dict[str, str]] | None:
    """Return the entry *raw* holds and its stamps, or ``None`` if it is not one (bad header)."""
    parts = raw.split(b"|", 5)
    if len(parts) != 6 or parts[0] != b"v2":
        return None
    try:
        expires, stale, delta = (int(p) / 1000 for p in parts[1:4])
        text = parts[4].decode("ascii")
    except ValueError:  # UnicodeDecodeError too
        return None
    stamps: dict[str, str] = {}
    for stamp in filter(None, text.split(",")):
        tag, colon, version = stamp.partition(":")
        if not colon or not _hex(tag) or not _hex(version):
            return None
        stamps[tag] = version
    return Entry(parts[5], expires, stale, delta), stamps


def _hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _read(raw: Any) -> tuple[Entry, dict[str, str]]:
    if isinstance(raw, str):  # a client that decodes: a cache needs bytes
        raw = raw.encode("utf-8", "surrogateescape")
    unpacked = unpack(bytes(raw))
    if unpacked is None:
        msg = f"not a cache entry: {bytes(raw[:16])!r}"
        raise InvalidEntry("header", msg)
    return unpacked


class RedisCacheStore:
    """Cache entries and load locks in Redis (standalone or Cluster)."""

    __slots__ = ("_backend", "_local_prefix", "_tags_prefix")

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._tags_prefix = backend.key("cache", "tags", "")
        # A standalone server holds the versions next to the values: its scripts check them.
        self._local_prefix = "" if backend.is_cluster else self._tags_prefix

    def keys(self, key: str) -> list[str]:
        """Return the value, lock, waiter-count and notify-list keys of *key* (one hash tag)."""
        digest, backend = _digest(key), self._backend
        return [backend.key("cache", digest, suffix) for suffix in ("v", "l", "w", "n")]

    def tag_key(self, tag: str) -> str:
        """Return the key of *tag*'s version (every tag's under the hash tag ``{tags}``)."""
        return self._tags_prefix + _digest(tag)

    async def get(self, key: str, now: float, tags: Iterable[str] = ()) -> Entry | None:
        """Return *key*'s entry if it is still servable and none of its tags moved on.

        *tags*, those the caller expects the value to have, let a cluster read their
        versions at the same time as the value.
        """
        value_key = self.keys(key)[:1]
        run = self._backend.run_script
        known: dict[str, str] = {}
        if self._local_prefix or not tags:
            raw = await run(_GET, value_key, (self._local_prefix,))
        else:
            digests = list(dict.fromkeys(_digest(tag) for tag in tags))
            keys = [self._tags_prefix + digest for digest in digests]
            replies: tuple[Any, ...] = await asyncio.gather(
                run(_GET, value_key, ("",)), run(_VERSIONS, keys, ()), return_exceptions=True
            )
            for reply in replies:  # both retrieved, the first failure raised
                if isinstance(reply, BaseException):
                    raise reply
            raw, versions = replies
            known = dict(zip(digests, map(_text, versions), strict=True))
        if raw is None:
            return None
        entry, stamps = _read(raw)
        if not entry.servable(now):
            return None
        if stamps and not self._local_prefix and not await self._current(stamps, known):
            return None
        return entry

    async def _current(self, stamps: dict[str, str], known: dict[str, str]) -> bool:
        """Whether each tag still has the version in *stamps* (on a cluster).

        *known* holds versions read already; the others are read now.
        """
        if any(known.get(tag, version) != version for tag, version in stamps.items()):
            return False
        unknown = [tag for tag in stamps if tag not in known]
        if not unknown:
            return True
        keys = [self._tags_prefix + tag for tag in unknown]
        versions = await self._backend.run_script(_VERSIONS, keys, ())
        return all(
            _text(version) == stamps[tag] for tag, version in zip(unknown, versions, strict=True)
        )

    async def stamp(self, tags: Iterable[str], lifetime: float) -> dict[str, Any]:
        """Return the current versions of *tags* (making missing ones), to store a value with.

        Each version is kept for at least *lifetime* seconds, the value's.
        """
        digests = list(dict.fromkeys(_digest(tag) for tag in tags))
        if not digests:
            return {}
        versions = await self._backend.run_script(
            _STAMP,
            [self._tags_prefix + digest for digest in digests],
            (max(1, math.ceil(lifetime * 1000)), *(secrets.token_hex(8) for _ in digests)),
        )
        return dict(zip(digests, map(_text, versions), strict=True))

    async def set(self, key: str, entry: Entry, stamps: dict[str, Any], now: float) -> None:
        """Store *entry* under *key* (no lock involved), with its tags' *stamps*."""
        ttl_ms = max(1, math.ceil((entry.stale_until - now) * 1000))
        await self._backend.run_script(_SET, self.keys(key)[:1], (pack(entry, stamps), ttl_ms))

    async def delete(self, key: str) -> None:
        """Forget *key*."""
        await self._backend.run_script(_DELETE, self.keys(key)[:1], ())

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Forget every value stored with any of *tags*: one atomic script, whatever they hold."""
        digests = list(dict.fromkeys(_digest(tag) for tag in tags))
        if digests:
            await self._backend.run_script(
                _INVALIDATE,
                [self._tags_prefix + digest for digest in digests],
                tuple(secrets.token_hex(8) for _ in digests),
            )

    # --- loading across processes -------------------------------------------------------

    async def claim(
        self, key: str, now: float, token: str, lease_ms: int, *, over_value: bool = False
    ) -> tuple[str, Any]:
        """Claim the load of *key*: ``("v", entry)``, ``("o", None)`` or ``("w", ttl_ms)``.

        Raises :class:`~resilient.cache.core.InvalidEntry` when the value there looks fresh
        but is not an entry; claim again *over_value* to load over it. A value whose tags
        moved on is claimed over here.
        """
        while True:
            reply = await self._backend.run_script(
                _CLAIM,
                self.keys(key),
                (
                    math.floor(now * 1000),
                    token,
                    lease_ms,
                    "1" if over_value else "0",
                    self._local_prefix,
                ),
            )
            kind = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if kind == "v":
                entry, stamps = _read(reply[1])
                if stamps and not self._local_prefix and not await self._current(stamps, {}):
                    over_value = True  # invalidated: load over it, as over a miss
                    continue
                return kind, entry
            if kind == "w":
                return kind, int(reply[1])
            return kind, None

    async def fill(
        self, key: str, token: str, entry: Entry | None, stamps: dict[str, Any], now: float
    ) -> int:
        """Store *entry* (or nothing), free the lock, wake the waiters; return how many."""
        if entry is None:
            value, ttl_ms = b"", 0
        else:
            value = pack(entry, stamps)
            ttl_ms = max(1, math.ceil((entry.stale_until - now) * 1000))
        woken = await self._backend.run_script(_FILL, self.keys(key), (token, value, ttl_ms))
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
