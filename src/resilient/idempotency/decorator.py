"""``@idempotent``: run an async function once per key; duplicates get its stored result."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, ParamSpec, TypeVar, cast

from resilient._templates import key_function
from resilient.backends.memory import MemoryBackend
from resilient.backends.redis import RedisBackend
from resilient.clock import Clock
from resilient.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyMismatch,
    ResultNotStored,
)
from resilient.events import (
    BackendFailed,
    IdempotencyNotStored,
    IdempotencyRejected,
    IdempotencyReplayed,
    Observer,
    emit,
)
from resilient.idempotency.core import ClaimStatus, IdempotencyStore, validate_seconds
from resilient.idempotency.keeper import BLOCK, DEFAULT_OBSERVER, Keeper, Sleep

__all__ = ["idempotent"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def idempotent(
    key: str | Callable[..., str],
    *,
    backend: MemoryBackend | RedisBackend | IdempotencyStore | None = None,
    ttl: float = 86_400.0,
    lease: float = 60.0,
    wait: float = 0.0,
    name: str | None = None,
    on_backend_error: Literal["open", "closed"] = "closed",
    backend_retry_after: float = 1.0,
    clock: Clock | None = None,
    observer: Observer | None = DEFAULT_OBSERVER,
    sleep: Sleep | None = None,
    quarantine: float = 0.0,
    replicas: int = 0,
    replica_timeout: float = 0.1,
) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Coroutine[Any, Any, _R]]]:
    """Run the decorated ``async def`` once per *key*; a duplicate gets the stored result.

    Made for consumers of at-least-once queues and for jobs: the key comes from the
    arguments, as a template (``"payment:{event.id}"``) or a callable given the same
    arguments as the function. The first call claims the key (renewing its *lease* while
    it runs) and stores its result for *ttl* seconds; later calls with the key return
    that result without running the function. The result must be JSON-serialisable (no
    pickle: a writable store must not mean code execution), and every caller, the first
    included, gets its JSON round trip, so all of them see the same value. The decorated
    function keeps its parameters and return type for a type checker, so declare one that
    comes back from JSON as it went in (``dict[str, ...]``, ``list``, ``str``, numbers,
    ``bool``, ``None``): a ``tuple`` comes back as a ``list``, a non-string key as a string.

    A call whose key is still in progress raises :class:`~resilient.IdempotencyConflict`
    (with ``retry_after``), or with *wait* > 0 waits up to *wait* seconds for the result.
    An exception from the function releases the key, so a retry runs it again. Storing the
    result is retried for up to one lease (the lease renewed meanwhile); a result that
    still cannot be stored raises :class:`~resilient.ResultNotStored` (with
    ``retry_after``) instead of returning: nothing records that the function ran. When the
    backend fails, ``"closed"`` (the default) raises
    :class:`~resilient.BackendUnavailable` without running the function; ``"open"`` runs
    it unguarded. Keys are scoped by *name* (default: the function's qualified name).
    When the store is found to have lost its records (Redis restarted empty), by this
    function's claim or any other guard's on the same backend, calls raise
    :class:`~resilient.BackendUnavailable` for *quarantine* seconds (if > 0) from the
    loss (its moment as the first instance that noticed recorded it in Redis); the guard
    whose claim noticed emits :class:`~resilient.events.BackendDataLost`.
    With *replicas* > 0 (a standalone Redis with replicas), a result is stored only once
    that many replicas have it (Redis ``WAIT``, up to *replica_timeout* seconds per try).

    >>> from resilient import MemoryBackend
    >>> @idempotent("charge:{event_id}", backend=MemoryBackend())
    ... async def charge(event_id: str, cents: int) -> dict[str, int]:
    ...     return {"charged": cents}
    """
    wait = validate_seconds("wait", wait, allow_zero=True)
    keeper = Keeper(
        backend,
        ttl=ttl,
        lease=lease,
        clock=clock,
        on_backend_error=on_backend_error,
        backend_retry_after=backend_retry_after,
        observer=observer,
        sleep=sleep,
        quarantine=quarantine,
        replicas=replicas,
        replica_timeout=replica_timeout,
    )

    def decorate(function: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        if not inspect.iscoroutinefunction(function):
            msg = f"idempotent decorates async functions; {function!r} is not one"
            raise TypeError(msg)
        key_of = key_function(key, function)
        scope = name or f"{function.__module__}.{function.__qualname__}"

        @functools.wraps(function)
        async def once(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            given = key_of(*args, **kwargs)
            if not isinstance(given, str) or not given:
                msg = f"the idempotency key must be a non-empty string, got {given!r}"
                raise ConfigurationError(msg)
            scoped = f"fn\x1f{scope}\x1f{given}"
            _check_quarantine(keeper, scope)
            try:
                if wait > 0:
                    claim, owner = await keeper.wait(scoped, "", wait)
                else:
                    claim, owner = await keeper.claim(scoped, "")
            except BackendError as exc:
                if keeper.on_backend_error == "open":
                    emit(observer, BackendFailed(BLOCK, "claim", exc, "ran unguarded"))
                    return await function(*args, **kwargs)
                emit(observer, BackendFailed(BLOCK, "claim", exc, "raised"))
                msg = f"the idempotency store is unavailable; {scope} was not run: {exc}"
                raise BackendUnavailable(msg, retry_after=keeper.backend_retry_after) from exc
            _check_quarantine(keeper, scope)  # a loss noticed since (a claimed key is released)
            status = claim.status
            if status is ClaimStatus.COMPLETED:
                emit(observer, IdempotencyReplayed(BLOCK, scoped))
                return cast("_R", json.loads(claim.payload or b"null"))
            if status is ClaimStatus.IN_PROGRESS:
                emit(observer, IdempotencyRejected(BLOCK, scoped, "in_progress"))
                msg = f"{scope} is already running for key {given!r}"
                raise IdempotencyConflict(msg, retry_after=claim.retry_after_ms / 1000)
            if status is ClaimStatus.MISMATCH:  # only a store shared with other callers
                msg = f"key {given!r} of {scope} was used for a different request"
                raise IdempotencyMismatch(msg)
            return await _run_once(keeper, scope, scoped, owner, function(*args, **kwargs))

        return once

    return decorate


def _check_quarantine(keeper: Keeper, scope: str) -> None:
    left = keeper.quarantine_left()
    if left > 0:
        msg = (
            f"the idempotency store lost its records; {scope} was not run: calls are "
            f"refused for {left:.1f} s more"
        )
        raise BackendUnavailable(msg, retry_after=left)


async def _run_once(keeper: Keeper, scope: str, scoped: str, owner: str, call: Awaitable[_R]) -> _R:
    heartbeat = keeper.heartbeat(scoped, owner)
    try:
        result = await call
    except BaseException:
        heartbeat.cancel()
        await keeper.release(scoped, owner)
        raise
    try:
        payload = json.dumps(result, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        heartbeat.cancel()
        await keeper.release(scoped, owner)
        msg = (
            f"{scope} returned a {type(result).__name__}, which JSON cannot encode: "
            "an idempotent function must return JSON-serialisable data"
        )
        raise IdempotencyError(msg) from exc
    try:  # the heartbeat keeps the lease while complete is retried
        stored = await keeper.complete(scoped, owner, payload, heartbeat)
    finally:
        heartbeat.cancel()
    if not stored:
        # Nothing records that the function ran: returning would pass for a success that
        # a later call with the key (once the lease runs out) may run again.
        emit(keeper.observer, IdempotencyNotStored(BLOCK, scoped, "raised"))
        msg = f"{scope} ran, but its result could not be stored for its idempotency key"
        raise ResultNotStored(msg, retry_after=keeper.backend_retry_after)
    return cast("_R", json.loads(payload))
