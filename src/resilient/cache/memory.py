"""The cache store of :class:`~resilient.MemoryBackend`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from resilient.backends.memory import MemoryBackend
from resilient.cache.core import Entry

__all__ = ["MemoryCacheStore"]


class MemoryCacheStore:
    """Entries in an LRU-ordered dict, bounded by the backend's ``max_keys``; tag versions.

    Tags are invalidated by bumping a version: an entry remembers the versions of its tags
    it was stamped with (:meth:`stamp`, before its value was loaded), and one whose tag
    moved on is gone. Invalidation is O(tags), whatever the number of entries.

    A new key in a full store evicts the least recently used entry (read or written), in
    O(1): no scan for expired entries. Those are dropped when read, and otherwise age out
    of the LRU order like any entry nobody reads.
    """

    __slots__ = ("_entries", "_lock", "_tags", "max_keys")

    def __init__(self, backend: MemoryBackend) -> None:
        self.max_keys = backend.max_keys
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._tags: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        """Iterate over the keys held, least recently used first (a copy: safe to change)."""
        with self._lock:
            return iter(list(self._entries))

    async def get(self, key: str, now: float, tags: Iterable[str] = ()) -> Entry | None:
        """Return *key*'s entry if it is still servable and none of its tags moved on.

        *tags*: those the caller expects it to have (of use to a remote store only).
        """
        return self.get_now(key, now)

    async def stamp(self, tags: Iterable[str], lifetime: float) -> dict[str, Any]:
        """Return the current versions of *tags*, to store an entry with (*lifetime*: unused)."""
        return self.stamp_now(tags)

    async def set(self, key: str, entry: Entry, stamps: dict[str, Any], now: float) -> None:
        """Store *entry* under *key*, stamped with its tags' versions *stamps*."""
        self.set_now(key, entry, stamps, now)

    def get_now(self, key: str, now: float) -> Entry | None:
        """Do :meth:`get` synchronously (it never waits on I/O)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if not entry.servable(now) or any(
                self._tags.get(tag, 0) != version for tag, version in entry.tags.items()
            ):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry

    def stamp_now(self, tags: Iterable[str]) -> dict[str, Any]:
        """Do :meth:`stamp` synchronously."""
        with self._lock:
            return {tag: self._tags.get(tag, 0) for tag in tags}

    def set_now(self, key: str, entry: Entry, stamps: dict[str, Any], now: float) -> None:
        """Do :meth:`set` synchronously."""
        with self._lock:
            entry.tags = dict(stamps)
            self._entries[key] = entry
            self._entries.move_to_end(key)
            if len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)  # the least recently used

    async def delete(self, key: str) -> None:
        """Forget *key*."""
        with self._lock:
            self._entries.pop(key, None)

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Make every entry set with any of *tags* disappear."""
        with self._lock:
            for tag in tags:
                self._tags[tag] = self._tags.get(tag, 0) + 1

    def __repr__(self) -> str:
        return f"MemoryCacheStore({len(self._entries)} entries, max_keys={self.max_keys})"
