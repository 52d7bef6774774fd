"""The idempotency store of :class:`~resilient.RedisBackend`: one Lua script per operation."""

from __future__ import annotations

import hashlib
import secrets

from resilient.backends.redis import RedisBackend, Script
from resilient.errors import BackendError, ConfigurationError
from resilient.idempotency.core import Claim, ClaimStatus

__all__ = ["RedisIdempotencyStore"]

_PACKAGE = "resilient.idempotency.lua"
_CLAIM = Script(_PACKAGE, "claim.lua", needs_now=True)
_COMPLETE = Script(_PACKAGE, "complete.lua", needs_now=True)
_RELEASE = Script(_PACKAGE, "release.lua", needs_now=True)
_EXTEND = Script(_PACKAGE, "extend.lua", needs_now=True)
_MARKER = Script(_PACKAGE, "marker.lua")


def _marker_id(value: bytes) -> bytes:
    """Return the id part of a marker's value, ``b"<id> <lost_ms>"`` (or the id alone)."""
    head, sep, tail = value.rpartition(b" ")
    return head if sep and tail.isdigit() else value


def _marker_lost_ms(value: bytes) -> int:
    """Return the moment (ms) a marker's value says the data was lost at, 0 if never."""
    _, sep, tail = value.rpartition(b" ")
    return int(tail) if sep and tail.isdigit() else 0


class RedisIdempotencyStore:
    """Idempotency records in Redis: one hash per key, one script call per operation.

    The Redis key is ``prefix:idem:{digest}:r``, where *digest* is a SHA-256 of the scoped
    key: bounded in length, free of the caller's identity, and spread over cluster slots.

    On a standalone server, each claim also reads a *marker*, ``prefix:idem:{marker}:m``:
    one key without a TTL whose value names the data it came with (a random id) and the
    moment that data was last found lost. Redis restarted without its data (or flushed)
    has no marker. The first claim after the loss by a store that had seen the old one
    makes a new marker stamped with the script's time (Redis ``TIME``, or the caller's
    ``now_ms``): that store learns that the records were lost (:attr:`Claim.data_lost`),
    and every store takes the loss's moment from the marker (:attr:`data_lost_at`), so
    the quarantines of all instances end together, including those of instances that had
    never seen the old marker. :meth:`prepare` reads (or makes) the marker before the
    first claim, so that a store notices a loss on its own first claim after it.

    A store that had seen no marker cannot tell a new server from an emptied one: the
    marker it makes is unstamped until a store that had seen the old one claims (and
    stamps it); until then, on a loss no store had learnt the marker of, nothing is
    noticed. A restart that kept its data (an append-only file) keeps the marker: no
    alarm. On Redis Cluster a script reaches only its own key's slot, so there is no
    marker: a lost node is not noticed (its replica, promoted, has the records it was
    sent).

    The store is shared by every guard built on one backend (``backend.store``), so one
    claim notices a loss for all of them: it is kept as :attr:`data_lost_at`, from which
    each guard applies its own quarantine.
    """

    __slots__ = ("_backend", "_data_lost_at", "_marker", "_marker_key", "_new_marker")

    def __init__(self, backend: RedisBackend) -> None:
        if backend.is_cluster and getattr(backend.client.get_encoder(), "decode_responses", False):
            # A standalone backend reads script replies as bytes on its own connection; a
            # cluster client's replies go through its decoder, which would mangle bodies.
            msg = (
                "idempotency on Redis Cluster stores response bodies as bytes: make the "
                "RedisCluster client with decode_responses=False (the default)"
            )
            raise ConfigurationError(msg)
        self._backend = backend
        self._marker_key = None if backend.is_cluster else backend.key("idem", "marker", "m")
        self._marker = b""  # the marker's value last seen ("<id> <lost_ms>"); none yet
        self._new_marker = secrets.token_hex(8)  # what this store gives a missing marker
        self._data_lost_at: float | None = None

    @property
    def data_lost_at(self) -> float | None:
        """Wall-clock time (s since the epoch) of the last loss this store knows of, or ``None``.

        Read from the marker's stamp: the time of the first claim, by a store that had
        seen the old marker, that found it gone (Redis ``TIME``, or the caller's
        ``now_ms`` when one was given), the same on every store of the data. Always
        ``None`` on Redis Cluster, which has no marker.
        """
        return self._data_lost_at

    async def prepare(self) -> None:
        """Learn the marker (making it if it is missing) before the first claim.

        A store that knows the marker notices a loss on its first claim after it; one
        that does not learns of it only from a stamp another store left. Calling it again
        (or after a claim) does nothing; on Redis Cluster it does nothing. Raise
        :class:`~resilient.errors.BackendError` when Redis fails.
        """
        marker_key = self._marker_key
        if marker_key is None or self._marker:
            return
        value = await self._backend.run_script(_MARKER, [marker_key], (self._new_marker,))
        if not self._marker:  # a claim may have taught it meanwhile
            self._learn(b"", bytes(value))

    def _learn(self, sent: bytes, value: bytes) -> bool:
        """Take *value*, the marker as a script found it; return whether it shows a loss.

        *sent* is the value the script was given as the one last seen. A loss is shown
        once per store: by the first reply whose id differs from the one the store knew,
        when the store knew one. Replies to claims sent before that one with the same old
        value find the store knowing the new id already.
        """
        new_id = _marker_id(value)
        known = self._marker
        lost = bool(sent) and _marker_id(sent) != new_id and _marker_id(known) != new_id
        if _marker_id(known) != new_id:
            # Never give a later missing marker an id some store may have seen already.
            self._new_marker = secrets.token_hex(8)
        self._marker = value
        lost_ms = _marker_lost_ms(value)
        if lost_ms > 0:
            at = lost_ms / 1000
            if self._data_lost_at is None or at > self._data_lost_at:
                self._data_lost_at = at
        return lost

    def _key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self._backend.key("idem", digest, "r")

    async def claim(
        self, key: str, fingerprint: str, owner: str, lease_ms: int, now_ms: int | None
    ) -> Claim:
        """Take *key* for *owner*, or report what holds it (see :mod:`.core`)."""
        now = "r" if now_ms is None else now_ms
        marker_key = self._marker_key
        sent = self._marker  # compared with the reply: other claims may update it meanwhile
        if marker_key is None:
            reply = await self._backend.run_script(
                _CLAIM, [self._key(key)], (now, fingerprint, owner, lease_ms)
            )
        else:
            reply = await self._backend.run_script(
                _CLAIM,
                [self._key(key), marker_key],
                (now, fingerprint, owner, lease_ms, sent, self._new_marker),
            )
        lost = len(reply) > 2 and self._learn(sent, bytes(reply[2]))
        kind = reply[0]
        if kind == b"n":
            return Claim(ClaimStatus.CLAIMED, data_lost=lost)
        if kind == b"p":
            return Claim(ClaimStatus.IN_PROGRESS, retry_after_ms=int(reply[1]), data_lost=lost)
        if kind == b"c":
            return Claim(ClaimStatus.COMPLETED, bytes(reply[1]), data_lost=lost)
        return Claim(ClaimStatus.MISMATCH, data_lost=lost)

    async def complete(
        self,
        key: str,
        owner: str,
        payload: bytes,
        ttl_ms: int,
        now_ms: int | None,
        *,
        replicas: int = 0,
        replica_timeout_ms: int = 0,
    ) -> bool:
        """Store *payload* for *ttl_ms* if *owner* holds a live lease on *key*.

        With *replicas*, Redis ``WAIT`` follows the script on the same connection, in the
        same round trip: the result counts as stored only once *replicas* replicas have
        it. Fewer within *replica_timeout_ms* raises :class:`BackendError` (the record is
        on the master, but would not survive its failover); the caller retries, and a
        repeated ``complete`` by the owner is a success that waits again.
        """
        now = "r" if now_ms is None else now_ms
        keys, args = [self._key(key)], (now, owner, ttl_ms, payload)
        if replicas <= 0:
            reply = await self._backend.run_script(_COMPLETE, keys, args)
            return bool(reply == 1)
        reply, acked = await self._backend.guard(
            "complete.lua + WAIT", self._complete_and_wait(keys, args, replicas, replica_timeout_ms)
        )
        if reply == 1 and acked < replicas:
            msg = (
                f"the result reached {acked} of {replicas} replicas within "
                f"{replica_timeout_ms} ms (Redis WAIT)"
            )
            raise BackendError(msg)
        return bool(reply == 1)

    async def _complete_and_wait(
        self, keys: list[str], args: tuple[str | int | bytes, ...], replicas: int, timeout_ms: int
    ) -> tuple[int, int]:
        # A connection of the client's pool, not the backend's own channel: WAIT blocks
        # its connection, which must not hold up every other block's scripts meanwhile.
        from redis.exceptions import NoScriptError  # noqa: PLC0415 (redis is optional)

        client = self._backend.client
        for command, script in (("EVALSHA", _COMPLETE.sha), ("EVAL", _COMPLETE.source)):
            async with client.pipeline(transaction=False) as pipe:
                pipe.execute_command(command, script, len(keys), *keys, *args)
                pipe.execute_command("WAIT", replicas, timeout_ms)
                stored, acked = await pipe.execute(raise_on_error=False)
            if isinstance(stored, NoScriptError) and command == "EVALSHA":
                continue  # loaded by the EVAL
            for reply in (stored, acked):
                if isinstance(reply, Exception):
                    raise reply
            return int(stored), int(acked)
        msg = "unreachable: EVAL never answers NOSCRIPT"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover

    async def release(self, key: str, owner: str, now_ms: int | None) -> bool:
        """Delete *key* if *owner* holds a live lease on it."""
        now = "r" if now_ms is None else now_ms
        reply = await self._backend.run_script(_RELEASE, [self._key(key)], (now, owner))
        return bool(reply == 1)

    async def extend(self, key: str, owner: str, lease_ms: int, now_ms: int | None) -> bool:
        """Renew *owner*'s live lease on *key* to *lease_ms* from now."""
        now = "r" if now_ms is None else now_ms
        reply = await self._backend.run_script(_EXTEND, [self._key(key)], (now, owner, lease_ms))
        return bool(reply == 1)

    def __repr__(self) -> str:
        return f"RedisIdempotencyStore({self._backend!r})"
