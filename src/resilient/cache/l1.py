"""An in-process tier in front of the Redis store, kept coherent through pub/sub.

Each :class:`~resilient.Cache` on Redis with ``l1=N`` keeps up to *N* recently read entries
in process, each for at most ``l1_ttl`` seconds. Writes, deletes and tag invalidations are
published on one channel; every instance drops what they name. The tier is used only
while its subscription is live: when Redis is unreachable it empties and stands aside
until the subscription is back, so a missed invalidation cannot outlive an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from typing import Any

from resilient._tasks import stop
from resilient.backends.redis import RedisBackend
from resilient.cache.core import Entry
from resilient.errors import BackendError
from resilient.events import BackendFailed, Observer, emit

__all__ = ["L1"]


class L1:
    """Recently read entries of one cache, dropped on other instances' invalidations."""

    __slots__ = (
        "_backend",
        "_channel",
        "_entries",
        "_task",
        "instance",
        "listening",
        "observer",
        "size",
        "ttl",
    )

    def __init__(
        self, backend: RedisBackend, size: int, ttl: float, observer: Observer | None
    ) -> None:
        self._backend = backend
        self._channel = f"{backend.prefix}:cache:invalidations"
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.instance = secrets.token_hex(8)
        self.listening = False
        self.observer = observer
        self.size = size
        self.ttl = ttl

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> Entry | None:
        """Return *key*'s entry if this tier may answer for it now."""
        self.ensure_listening()
        if not self.listening:
            return None
        held = self._entries.get(key)
        if held is None:
            return None
        entry, until = held
        if now >= until or not entry.servable(now):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry, now: float) -> None:
        """Keep *entry* for at most ``ttl`` seconds (and no longer than it is servable)."""
        if not self.listening:
            return
        self._entries[key] = (entry, min(entry.stale_until, now + self.ttl))
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        """Forget *key* here."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything here."""
        self._entries.clear()

    async def publish(self, kind: str, name: str) -> None:
        """Tell the other instances to drop *name* (``kind`` ``"k"``: a key; ``"t"``: a tag)."""
        message = f"{self.instance}|{kind}|{name}"
        client = self._backend.client
        await self._backend.guard(
            "publishing an invalidation", client.publish(self._channel, message)
        )

    def ensure_listening(self) -> None:
        """Start the subscription task on the running loop, if it is not running."""
        if self._task is not None and not self._task.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next async call
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            pubsub: Any = self._backend.client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.listening = True
                    elif message["type"] == "message":
                        self._handle(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: stand aside, then subscribe again
                error = exc if isinstance(exc, BackendError) else BackendError(repr(exc))
                emit(self.observer, BackendFailed("cache", "l1", error, "in-process tier off"))
            finally:
                self.listening = False
                self._entries.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(1.0)

    def _handle(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        instance, _, rest = text.partition("|")
        if instance == self.instance:
            return
        kind, _, name = rest.partition("|")
        if kind == "k":
            self.drop(name)
        else:
            self.clear()  # entries read from Redis do not know their tags

    async def aclose(self) -> None:
        """Stop listening."""
        task, self._task = self._task, None
        await stop(task)

    def __repr__(self) -> str:
        return f"L1({len(self._entries)}/{self.size} entries, listening={self.listening})"
