"""The part the middleware and the decorator share: claims, leases and their heartbeat."""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from math import ceil
from typing import Final, Literal

from resilient.backends.memory import MemoryBackend
from resilient.backends.redis import RedisBackend
from resilient.clock import Clock
from resilient.errors import BackendError, ConfigurationError
from resilient.events import (
    BackendDataLost,
    BackendFailed,
    LeaseLost,
    LoggingObserver,
    Observer,
    emit,
)
from resilient.idempotency.core import Claim, ClaimStatus, IdempotencyStore, validate_seconds

__all__ = ["BLOCK", "Heartbeat", "Keeper", "store_for"]

BLOCK: Final = "idempotency"
"""The ``block`` of every event of the idempotency block: the middleware's and the decorator's."""

DEFAULT_OBSERVER = LoggingObserver()

Sleep = Callable[[float], Awaitable[None]]

_FIRST_RETRY = 0.05
_MAX_RETRY_WAIT = 0.5


def store_for(backend: MemoryBackend | RedisBackend | IdempotencyStore) -> IdempotencyStore:
    """Return the idempotency store of *backend* (or *backend* itself, if it is a store)."""
    if isinstance(backend, MemoryBackend):
        from resilient.idempotency.memory import MemoryIdempotencyStore  # noqa: PLC0415

        return backend.store("idempotency", MemoryIdempotencyStore)
    if isinstance(backend, RedisBackend):
        from resilient.idempotency.redis import RedisIdempotencyStore  # noqa: PLC0415

        return backend.store("idempotency", RedisIdempotencyStore)
    if all(callable(getattr(backend, name, None)) for name in ("claim", "complete", "release")):
        return backend
    msg = (
        f"backend must be a MemoryBackend, a RedisBackend or an idempotency store, not {backend!r}"
    )
    raise ConfigurationError(msg)


StoreComplete = Callable[[str, str, bytes, int, int | None], Awaitable[bool]]


def _waiting_complete(
    backend: MemoryBackend | RedisBackend | IdempotencyStore | None,
    replicas: int,
    replica_timeout: float,
) -> StoreComplete:
    """Return the Redis store's ``complete`` that WAITs for *replicas* (validated here)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        msg = f"replicas must be an integer >= 0, not {replicas!r}"
        raise ConfigurationError(msg)
    if not isinstance(backend, RedisBackend) or backend.is_cluster:
        # WAIT counts the replicas of the server its own connection talks to.
        msg = "replicas= needs a RedisBackend on a standalone Redis (a master with replicas)"
        raise ConfigurationError(msg)
    timeout = validate_seconds("replica_timeout", replica_timeout)
    if backend.timeout is not None and timeout >= backend.timeout:
        msg = (
            f"replica_timeout ({timeout} s) must be shorter than the backend's timeout "
            f"({backend.timeout} s), or every WAIT that runs its course times out"
        )
        raise ConfigurationError(msg)
    from resilient.idempotency.redis import RedisIdempotencyStore  # noqa: PLC0415

    store = backend.store("idempotency", RedisIdempotencyStore)
    return functools.partial(
        store.complete, replicas=replicas, replica_timeout_ms=max(1, ceil(timeout * 1000))
    )


class Keeper:
    """Claims keys on a store for one owner at a time, and keeps their leases alive."""

    __slots__ = (
        "_quarantine_until",
        "_seen_lost_at",
        "_store_complete",
        "backend_retry_after",
        "clock",
        "lease",
        "lease_ms",
        "observer",
        "on_backend_error",
        "quarantine",
        "sleep",
        "store",
        "ttl",
        "ttl_ms",
    )

    def __init__(
        self,
        backend: MemoryBackend | RedisBackend | IdempotencyStore | None,
        *,
        ttl: float,
        lease: float,
        clock: Clock | None,
        on_backend_error: Literal["open", "closed"],
        backend_retry_after: float,
        observer: Observer | None,
        sleep: Sleep | None,
        quarantine: float = 0.0,
        replicas: int = 0,
        replica_timeout: float = 0.1,
    ) -> None:
        if on_backend_error not in ("open", "closed"):
            msg = f"on_backend_error must be 'open' or 'closed', not {on_backend_error!r}"
            raise ConfigurationError(msg)
        self.ttl = validate_seconds("ttl", ttl)
        self.lease = validate_seconds("lease", lease)
        self.backend_retry_after = validate_seconds("backend_retry_after", backend_retry_after)
        self.quarantine = validate_seconds("quarantine", quarantine, allow_zero=True)
        self._quarantine_until = float("-inf")
        self._seen_lost_at: float | None = None  # the store's data_lost_at last seen
        self.ttl_ms = max(1, ceil(self.ttl * 1000))
        self.lease_ms = max(1, ceil(self.lease * 1000))
        self.store = store_for(MemoryBackend() if backend is None else backend)
        self._store_complete: StoreComplete = self.store.complete
        if replicas != 0:
            self._store_complete = _waiting_complete(backend, replicas, replica_timeout)
        self.clock = clock
        self.on_backend_error = on_backend_error
        self.observer = observer
        self.sleep = sleep

    def now_ms(self) -> int | None:
        """Return the injected clock's wall time in ms, or ``None`` for the store's own clock."""
        clock = self.clock
        return None if clock is None else int(clock.time() * 1000)

    async def claim(self, key: str, fingerprint: str) -> tuple[Claim, str]:
        """Claim *key* for a new owner; return the claim and the owner's token.

        Raise :class:`~resilient.errors.BackendError` when the store fails.

        If a loss of records is noticed meanwhile (by this claim or by another guard's, on
        the same store) and *quarantine* is set, a key just claimed is released again: the
        caller, finding :meth:`quarantine_left` above 0, refuses the request.

        The claim that notices a loss emits :class:`~resilient.events.BackendDataLost`,
        so a loss is reported once per store, however many guards share it: the event
        counts losses (what a metric or an alert wants), not guards, and a guard that
        claims nothing until its quarantine is over would report it late or never.
        """
        owner = secrets.token_hex(16)
        claim = await self.store.claim(key, fingerprint, owner, self.lease_ms, self.now_ms())
        if claim.data_lost:
            emit(self.observer, BackendDataLost(BLOCK, self.quarantine))
        if claim.status is ClaimStatus.CLAIMED and self.quarantine_left() > 0:
            await self.release(key, owner)  # refused, like every claim now
        return claim, owner

    async def prepare(self) -> None:
        """Let the store learn, before the first claim, what it needs to notice a loss.

        The Redis store reads its marker (``prepare()``); a store without ``prepare``
        needs nothing. A failure of the store is reported and left to the first claim,
        which learns the marker as it always could.
        """
        prepare: Callable[[], Awaitable[None]] | None = getattr(self.store, "prepare", None)
        if prepare is None:
            return
        try:
            await prepare()
        except BackendError as exc:
            emit(
                self.observer,
                BackendFailed(BLOCK, "prepare", exc, "marker left to the first claim"),
            )

    def quarantine_left(self) -> float:
        """Return how many seconds new claims are still refused for (0.0: none).

        With *quarantine* set, a quarantine starts at the moment the store's records were
        found lost (:attr:`~.core.IdempotencyStore.data_lost_at`: on Redis, the moment
        recorded in the marker by the first instance that noticed, the same for every
        instance and every guard): for that long, the callers refuse guarded requests
        rather than run them while the duplicates of requests in flight at the loss may
        arrive. The
        moment of the loss, a wall-clock time, is read once per loss and turned into
        this keeper's monotonic clock, so a later step of the wall clock moves nothing.
        """
        if self.quarantine <= 0:
            return 0.0
        lost_at: float | None = getattr(self.store, "data_lost_at", None)
        if lost_at is not None and lost_at != self._seen_lost_at:
            self._seen_lost_at = lost_at
            wall = time.time() if self.clock is None else self.clock.time()
            since = min(max(wall - lost_at, 0.0), self.quarantine)
            self._quarantine_until = self.monotonic() + self.quarantine - since
        return max(0.0, self._quarantine_until - self.monotonic())

    async def wait(self, key: str, fingerprint: str, seconds: float) -> tuple[Claim, str]:
        """Claim *key*, waiting up to *seconds* while another owner holds it.

        The store is asked again after 10 ms, then after doubling intervals capped at
        200 ms: a bounded number of calls per waiting request.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        interval = 0.01
        while True:
            claim, owner = await self.claim(key, fingerprint)
            left = deadline - loop.time()
            if claim.status is not ClaimStatus.IN_PROGRESS or left <= 0:
                return claim, owner
            if self.quarantine_left() > 0:  # a loss noticed meanwhile: the caller refuses
                return claim, owner
            await asyncio.sleep(min(interval, left, claim.retry_after_ms / 1000 or interval))
            interval = min(interval * 2, 0.2)

    def monotonic(self) -> float:
        """Return the injected clock's monotonic time, or the system's."""
        clock = self.clock
        return time.monotonic() if clock is None else clock.monotonic()

    async def complete(self, key: str, owner: str, payload: bytes, heartbeat: Heartbeat) -> bool:
        """Store *payload* for *key*, retrying while the lease lasts; return whether it is stored.

        A failed attempt is tried again after 50 ms, then after doubling waits capped at
        500 ms, while *heartbeat* keeps the lease alive, until the lease (as last renewed,
        and at most one lease from the first attempt) runs out. The store itself refuses a
        late attempt (the lease ended; another owner may hold the key), so retrying can
        never store a result twice. A store's ``complete`` reports success when repeated
        for an owner whose record it already completed (see :mod:`.core`), so an attempt
        whose reply was lost is not mistaken for a lost lease.
        """
        sleep = self.sleep or asyncio.sleep
        give_up_at = self.monotonic() + self.lease
        delay = _FIRST_RETRY
        while True:
            try:
                stored = await self._store_complete(key, owner, payload, self.ttl_ms, self.now_ms())
            except BackendError as exc:
                left = min(heartbeat.lease_end, give_up_at) - self.monotonic()
                if left <= 0:
                    emit(
                        self.observer,
                        BackendFailed(BLOCK, "complete", exc, "result not stored"),
                    )
                    return False
                await sleep(min(delay, left))
                delay = min(delay * 2, _MAX_RETRY_WAIT)
                continue
            if not stored:
                emit(self.observer, LeaseLost(BLOCK, key, "complete"))
            return stored

    async def release(self, key: str, owner: str) -> None:
        """Release *key*, whatever happens to the caller meanwhile (shielded)."""
        try:
            released = await asyncio.shield(self.store.release(key, owner, self.now_ms()))
        except BackendError as exc:
            emit(
                self.observer,
                BackendFailed(BLOCK, "release", exc, "key kept until its lease ends"),
            )
            return
        if not released:
            emit(self.observer, LeaseLost(BLOCK, key, "release"))

    def heartbeat(self, key: str, owner: str) -> Heartbeat:
        """Start renewing *owner*'s lease on *key* every third of the lease; cancel when done."""
        return Heartbeat(self, key, owner)

    async def beat(self, key: str, owner: str) -> bool | None:
        """Renew the lease once: ``True`` renewed, ``None`` the store failed, ``False`` lost."""
        try:
            extended = await self.store.extend(key, owner, self.lease_ms, self.now_ms())
        except BackendError as exc:
            emit(self.observer, BackendFailed(BLOCK, "extend", exc, "lease not extended"))
            return None
        return extended


class Heartbeat:
    """Renews a lease every third of it until cancelled; knows when the lease ends.

    Most requests end long before their first renewal, so it starts as a timer on the
    event loop, cheaper than a task, and makes a task only when a renewal is due. With an
    injected *sleep* (tests), it is a task looping on that sleep instead.

    ``lease_end`` is the keeper's monotonic time at which the lease runs out as far as
    this process knows: one lease after the claim, or after the last renewal was sent.
    """

    __slots__ = (
        "_beating",
        "_handle",
        "_interval",
        "_keeper",
        "_key",
        "_owner",
        "_stopped",
        "_task",
        "lease_end",
    )

    def __init__(self, keeper: Keeper, key: str, owner: str) -> None:
        self._keeper = keeper
        self._key = key
        self._owner = owner
        self._interval = keeper.lease / 3
        self._stopped = False
        self._beating = False
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.lease_end = keeper.monotonic() + keeper.lease
        loop = asyncio.get_running_loop()
        if keeper.sleep is None:
            self._handle = loop.call_later(self._interval, self._due)
        else:
            self._task = loop.create_task(self._loop(keeper.sleep))

    def _due(self) -> None:
        self._handle = None
        self._task = asyncio.get_running_loop().create_task(self._renew())

    async def _beat(self) -> bool:
        keeper = self._keeper
        sent = keeper.monotonic()
        self._beating = True
        try:
            extended = await keeper.beat(self._key, self._owner)
        finally:
            self._beating = False
        if extended:
            self.lease_end = sent + keeper.lease
        elif extended is False and not self._stopped:
            # Not when stopped: the owner completed or released the record meanwhile.
            emit(keeper.observer, LeaseLost(BLOCK, self._key, "extend"))
        return extended is not False and not self._stopped

    async def _renew(self) -> None:
        if await self._beat():
            self._handle = asyncio.get_running_loop().call_later(self._interval, self._due)

    async def _loop(self, sleep: Sleep) -> None:
        while True:
            await sleep(self._interval)
            if not await self._beat():
                return

    def cancel(self) -> None:
        """Stop renewing.

        A renewal already sent is left to finish (cancelling it would drop the backend's
        connection mid-reply); it renews no further.
        """
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None and not self._beating:
            self._task.cancel()
