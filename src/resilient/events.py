"""Events: what the blocks report about themselves, and the hook that receives them.

Every block takes an ``observer``: any callable that accepts an :class:`Event`. Events
are frozen, slotted dataclasses, cheap to build and safe to keep. The default observer,
:class:`LoggingObserver`, writes them to the ``resilient`` logger; Prometheus or
OpenTelemetry adapters are observers too, and :func:`observe_all` fans one event out to
several of them.

An observer runs on the request path: it must be quick and must not raise (an exception
from an observer is logged and swallowed, so a broken metrics exporter never fails a
request).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Protocol

__all__ = [
    "BackendDataLost",
    "BackendFailed",
    "BreakerStateChanged",
    "CacheEntryInvalid",
    "CacheHit",
    "CacheLockWait",
    "CacheMiss",
    "CacheRefreshed",
    "CallFailed",
    "CallRejected",
    "CallSucceeded",
    "Event",
    "IdempotencyNotStored",
    "IdempotencyRejected",
    "IdempotencyReplayed",
    "KeySetFetchFailed",
    "KeySetFetched",
    "LeaseLost",
    "LoggingObserver",
    "Observer",
    "RateLimited",
    "RetryBudgetExhausted",
    "RetryGaveUp",
    "RetryScheduled",
    "StaleServed",
    "TokenRejected",
    "emit",
    "observe_all",
]

logger = logging.getLogger("resilient")


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event; ``block`` names the block that emitted it."""

    level: ClassVar[int] = logging.DEBUG
    block: str


@dataclass(frozen=True, slots=True)
class RateLimited(Event):
    """A rate limit denied a request or call for ``key``."""

    key: str
    policy: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class BackendFailed(Event):
    """A backend call failed; ``outcome`` says what the block did about it."""

    level: ClassVar[int] = logging.WARNING
    operation: str
    error: BaseException
    outcome: str


@dataclass(frozen=True, slots=True)
class IdempotencyReplayed(Event):
    """A duplicate request or call got the stored result of the first one."""

    key: str


@dataclass(frozen=True, slots=True)
class IdempotencyRejected(Event):
    """A request or call reusing an idempotency key was rejected, not run nor replayed.

    ``reason`` is ``"in_progress"`` (the key's first request or call is still running:
    the middleware answered ``409``, ``@idempotent`` raised
    :class:`~resilient.errors.IdempotencyConflict`) or ``"mismatch"`` (the key was used
    for a different request: ``422``).
    """

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseLost(Event):
    """An owner lost its claim on ``key`` before ``operation`` (complete, release, extend).

    Its lease ran out (the handler outlived it, or its heartbeat could not reach the
    store), so another request may have claimed the key: the result was not stored.
    """

    level: ClassVar[int] = logging.WARNING
    key: str
    operation: str


@dataclass(frozen=True, slots=True)
class IdempotencyNotStored(Event):
    """A guarded call ran, but its result could not be stored while its lease lasted.

    Nothing records that it ran, so a later duplicate may run it again: the caller is
    never told it succeeded. ``outcome`` says what it was told instead: ``"answered 503"``
    (the middleware) or ``"raised"`` (``@idempotent``:
    :class:`~resilient.errors.ResultNotStored`).
    """

    level: ClassVar[int] = logging.ERROR
    key: str
    outcome: str


@dataclass(frozen=True, slots=True)
class BackendDataLost(Event):
    """The backend lost the block's records: Redis restarted empty, or was flushed.

    Requests made before the loss may run again when they are retried. Emitted once per
    loss per store, by the guard whose claim noticed it; ``quarantine`` is that guard's:
    it refuses new claims for that many seconds (0: none). Every other guard on the
    same backend applies its own ``quarantine`` from the same moment.
    """

    level: ClassVar[int] = logging.ERROR
    quarantine: float


@dataclass(frozen=True, slots=True)
class BreakerStateChanged(Event):
    """Circuit breaker ``name`` moved from ``old`` to ``new`` (state values), and why."""

    level: ClassVar[int] = logging.WARNING
    name: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class CallRejected(Event):
    """Circuit breaker ``name`` rejected a call; it may admit one in ``retry_after`` s."""

    name: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class CallFailed(Event):
    """A call through circuit breaker ``name`` counted as a failure or as slow."""

    name: str
    error: BaseException | None
    slow: bool
    duration: float | None


@dataclass(frozen=True, slots=True)
class CallSucceeded(Event):
    """A call through circuit breaker ``name`` succeeded (only with ``observe_successes``)."""

    name: str
    duration: float | None


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """Attempt number ``attempt`` of ``name`` failed; the next starts in ``wait`` seconds.

    ``cause`` is the exception the attempt raised, or the result it returned when a
    ``result=`` predicate asked for a retry.
    """

    level: ClassVar[int] = logging.INFO
    name: str
    attempt: int
    wait: float
    cause: object


@dataclass(frozen=True, slots=True)
class RetryGaveUp(Event):
    """``name`` failed after ``attempts`` attempts and will not be tried again.

    ``reason`` says why: ``"attempts"`` (all used), ``"deadline"`` (the next wait would
    reach it), ``"budget"`` (the :class:`~resilient.RetryBudget` is empty) or
    ``"not_retryable"`` (a retry ended in an exception the policy does not retry).
    ``cause`` is the last exception, or the last result; it is what the caller gets.
    """

    level: ClassVar[int] = logging.WARNING
    name: str
    attempts: int
    reason: str
    cause: object


@dataclass(frozen=True, slots=True)
class RetryBudgetExhausted(Event):
    """A retry of ``name`` was refused because its :class:`~resilient.RetryBudget` is empty.

    Many of these mean the dependency is failing for everyone: retrying harder would
    only add load.
    """

    level: ClassVar[int] = logging.WARNING
    name: str
    attempt: int


@dataclass(frozen=True, slots=True)
class CacheEntryInvalid(Event):
    """The entry stored for ``key`` could not be read: treated as a miss and overwritten.

    ``reason``: ``"header"`` (not an entry of this cache: another writer, another version)
    or ``"body"`` (the serializer could not read the value: a pickle, a truncated value,
    bytes that are not UTF-8 JSON). Each read that meets the entry reports it: on Redis,
    the lookup and then the claim of the load that overwrites it.
    """

    level: ClassVar[int] = logging.WARNING
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class CacheHit(Event):
    """The cache answered ``key`` with a fresh value."""

    key: str


@dataclass(frozen=True, slots=True)
class CacheLockWait(Event):
    """Another process is loading ``key``: this one waits, up to ``seconds``, to be woken."""

    key: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CacheMiss(Event):
    """The cache held no servable value for ``key``: the loader runs (once, shared)."""

    key: str


@dataclass(frozen=True, slots=True)
class StaleServed(Event):
    """A stale value of ``key`` was served; ``reason``: ``"revalidating"`` or ``"error"``."""

    level: ClassVar[int] = logging.INFO
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class CacheRefreshed(Event):
    """``key`` is recomputed in the background; ``reason``: ``"early"`` or ``"stale"``."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeySetFetched(Event):
    """A JWKS was fetched from ``url``: ``keys`` usable keys, cached for ``ttl`` seconds."""

    level: ClassVar[int] = logging.INFO
    url: str
    keys: int
    ttl: float


@dataclass(frozen=True, slots=True)
class KeySetFetchFailed(Event):
    """Fetching the JWKS at ``url`` failed.

    ``outcome`` is ``"stale"`` when the last good keys keep serving, ``"unavailable"``
    when none are recent enough (tokens cannot be checked until a fetch succeeds).
    """

    level: ClassVar[int] = logging.WARNING
    url: str
    error: BaseException
    outcome: str


@dataclass(frozen=True, slots=True)
class TokenRejected(Event):
    """A token was refused; ``reason`` names the :class:`~resilient.InvalidToken` subclass."""

    reason: str


class Observer(Protocol):
    """Anything that can receive an :class:`Event`."""

    def __call__(self, event: Event, /) -> None:
        """Receive *event*; must return quickly and should not raise."""
        ...


class LoggingObserver:
    """Log each event to the ``resilient`` logger, at the event class's level.

    Backend failures are warnings; decisions are debug messages.
    """

    __slots__ = ("_logger",)

    def __init__(self, logger_: logging.Logger | None = None) -> None:
        self._logger = logger_ or logger

    def __call__(self, event: Event, /) -> None:
        """Log *event*."""
        if self._logger.isEnabledFor(event.level):
            self._logger.log(event.level, "%s", event)

    def __repr__(self) -> str:
        return f"LoggingObserver({self._logger.name!r})"


class _Fanout:
    __slots__ = ("observers",)

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers

    def __call__(self, event: Event, /) -> None:
        for observer in self.observers:
            emit(observer, event)


def observe_all(*observers: Observer) -> Observer:
    """Return one observer that passes each event to every one of *observers*, in order."""
    return _Fanout(observers)


def emit(observer: Observer | None, event: Event) -> None:
    """Give *event* to *observer*, logging and swallowing anything it raises."""
    if observer is None:
        return
    try:
        observer(event)
    except Exception:
        logger.exception("observer %r failed on %r", observer, event)
