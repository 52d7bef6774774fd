"""The metrics the events become, written once for every metrics adapter.

:func:`measure` turns an :class:`~resilient.events.Event` into measurements of the
metrics in :data:`METRICS`; :mod:`resilient.prometheus` and
:mod:`resilient.opentelemetry` only translate names and record values.

Labels are bounded on purpose: a breaker, retry or policy name, a block, an outcome, a
state, a reason, an exception class, a key-set URL. Never a rate-limit, idempotency or
cache key, a user or a client address: one time series per key would let any client
grow the metrics store without bound.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypeVar

from resilient.breaker.core import State
from resilient.errors import ConfigurationError
from resilient.events import (
    BackendDataLost,
    BackendFailed,
    BreakerStateChanged,
    CacheEntryInvalid,
    CacheHit,
    CacheLockWait,
    CacheMiss,
    CacheRefreshed,
    CallFailed,
    CallRejected,
    CallSucceeded,
    Event,
    IdempotencyNotStored,
    IdempotencyRejected,
    IdempotencyReplayed,
    KeySetFetched,
    KeySetFetchFailed,
    LeaseLost,
    RateLimited,
    RetryBudgetExhausted,
    RetryGaveUp,
    RetryScheduled,
    StaleServed,
    TokenRejected,
)

__all__ = ["METRICS", "Measurement", "Metric", "check_namespace", "error_type", "measure"]

Kind: TypeAlias = Literal["counter", "histogram", "gauge"]


# eq=False: each metric is one module constant, so identity is equality, and hashing it
# (once per measurement, to find its instrument) costs nothing.
@dataclass(frozen=True, slots=True, eq=False)
class Metric:
    """One metric, named without its namespace: ``"breaker.call.duration"``.

    ``unit`` is a UCUM unit for OpenTelemetry: ``"s"`` makes Prometheus add ``_seconds``;
    ``{...}`` annotations only name what is counted. A gauge keeps the last value
    recorded for each set of label values.
    """

    name: str
    kind: Kind
    unit: str
    labels: tuple[str, ...]
    description: str
    buckets: tuple[float, ...] | None = None

    def prometheus_name(self, namespace: str) -> str:
        """Return the name in Prometheus's exposition, before a counter's ``_total``."""
        suffix = "_seconds" if self.unit == "s" else ""
        return f"{namespace}_{self.name.replace('.', '_')}{suffix}"

    def opentelemetry_name(self, namespace: str) -> str:
        """Return the instrument name for OpenTelemetry (its unit is separate)."""
        return f"{namespace}.{self.name}"


@dataclass(frozen=True, slots=True)
class Measurement:
    """Add ``value`` to a counter, observe it in a histogram or set a gauge to it.

    ``labels`` are the values of :attr:`Metric.labels`, in the same order.
    """

    metric: Metric
    labels: tuple[str, ...]
    value: float = 1.0


# Durations of guarded calls: milliseconds to the tens of seconds a slow dependency takes.
_CALL_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Backoff waits: full jitter starts near zero, caps are seconds to a minute.
_WAIT_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RATELIMIT_DENIED: Final = Metric(
    "ratelimit.denied",
    "counter",
    "{request}",
    ("policy",),
    "Requests or calls a rate limit denied.",
)
BACKEND_ERRORS: Final = Metric(
    "backend.errors",
    "counter",
    "{error}",
    ("block", "operation", "outcome", "error.type"),
    "Failed backend calls, by block and operation, and what the block did instead.",
)
IDEMPOTENCY_DUPLICATES: Final = Metric(
    "idempotency.duplicates",
    "counter",
    "{request}",
    ("block", "outcome"),
    "Requests or calls that reused an idempotency key: replayed, in_progress or mismatch.",
)
IDEMPOTENCY_LEASES_LOST: Final = Metric(
    "idempotency.leases_lost",
    "counter",
    "{lease}",
    ("block", "operation"),
    "Claims on an idempotency key that ran out before their owner finished.",
)
IDEMPOTENCY_NOT_STORED: Final = Metric(
    "idempotency.not_stored",
    "counter",
    "{request}",
    ("block", "outcome"),
    "Guarded calls that ran but whose result could not be stored: answered 503 or raised.",
)
BACKEND_DATA_LOST: Final = Metric(
    "backend.data_lost",
    "counter",
    "{loss}",
    ("block",),
    "Times a block found that its backend had lost its records (Redis restarted empty).",
)
BREAKER_TRANSITIONS: Final = Metric(
    "breaker.transitions",
    "counter",
    "{transition}",
    ("name", "from", "to"),
    "Circuit breaker state changes.",
)
BREAKER_STATE: Final = Metric(
    "breaker.state",
    "gauge",
    "1",
    ("name", "state"),
    "1 for the state each circuit breaker is in, 0 for the others (after its first change).",
)
BREAKER_REJECTED: Final = Metric(
    "breaker.rejected",
    "counter",
    "{call}",
    ("name",),
    "Calls an open or forced-open circuit rejected without running them.",
)
BREAKER_CALLS: Final = Metric(
    "breaker.calls",
    "counter",
    "{call}",
    ("name", "outcome"),
    "Calls through a circuit breaker: error, slow or failure (counted against the circuit), "
    "success (only with observe_successes).",
)
BREAKER_CALL_DURATION: Final = Metric(
    "breaker.call.duration",
    "histogram",
    "s",
    ("name", "outcome"),
    "Duration of calls through a circuit breaker that times its calls.",
    _CALL_BUCKETS,
)
RETRY_SCHEDULED: Final = Metric(
    "retry.scheduled",
    "counter",
    "{retry}",
    ("name", "error.type"),
    "Failed attempts followed by another, by what the attempt raised (or result).",
)
RETRY_WAIT: Final = Metric(
    "retry.wait",
    "histogram",
    "s",
    ("name",),
    "Waits before the next attempt.",
    _WAIT_BUCKETS,
)
RETRY_GAVE_UP: Final = Metric(
    "retry.gave_up",
    "counter",
    "{call}",
    ("name", "reason"),
    "Calls that failed for good: attempts, deadline, budget or not_retryable.",
)
RETRY_BUDGET_EXHAUSTED: Final = Metric(
    "retry.budget_exhausted",
    "counter",
    "{retry}",
    ("name",),
    "Retries refused because the retry budget was empty.",
)
CACHE_LOOKUPS: Final = Metric(
    "cache.lookups",
    "counter",
    "{lookup}",
    ("result",),
    "Cache lookups: hit (fresh), stale (served while it is recomputed) or miss (loaded).",
)
CACHE_STALE_SERVED: Final = Metric(
    "cache.stale_served",
    "counter",
    "{lookup}",
    ("reason",),
    "Stale values served: revalidating (refreshed in the background) or error (loader failed).",
)
CACHE_REFRESHES: Final = Metric(
    "cache.refreshes",
    "counter",
    "{refresh}",
    ("reason",),
    "Background recomputations: early (XFetch) or stale (stale-while-revalidate).",
)
CACHE_LOCK_WAITS: Final = Metric(
    "cache.lock_waits",
    "counter",
    "{wait}",
    (),
    "Misses that waited for another process loading the same key.",
)
CACHE_INVALID_ENTRIES: Final = Metric(
    "cache.invalid_entries",
    "counter",
    "{entry}",
    ("reason",),
    "Entries that could not be read (header or body): treated as misses and overwritten.",
)
JWKS_FETCHES: Final = Metric(
    "jwks.fetches", "counter", "{fetch}", ("url",), "Key sets fetched and cached."
)
JWKS_FETCH_FAILURES: Final = Metric(
    "jwks.fetch_failures",
    "counter",
    "{fetch}",
    ("url", "outcome", "error.type"),
    "Failed key-set fetches: stale (old keys still serve) or unavailable (none left).",
)
JWKS_KEYS: Final = Metric(
    "jwks.keys", "gauge", "{key}", ("url",), "Usable keys in the last key set fetched."
)
JWT_REJECTED: Final = Metric(
    "jwt.rejected",
    "counter",
    "{token}",
    ("reason",),
    "Tokens refused, by the InvalidToken subclass that says why.",
)

METRICS: Final = (
    RATELIMIT_DENIED,
    BACKEND_ERRORS,
    IDEMPOTENCY_DUPLICATES,
    IDEMPOTENCY_LEASES_LOST,
    IDEMPOTENCY_NOT_STORED,
    BACKEND_DATA_LOST,
    BREAKER_TRANSITIONS,
    BREAKER_STATE,
    BREAKER_REJECTED,
    BREAKER_CALLS,
    BREAKER_CALL_DURATION,
    RETRY_SCHEDULED,
    RETRY_WAIT,
    RETRY_GAVE_UP,
    RETRY_BUDGET_EXHAUSTED,
    CACHE_LOOKUPS,
    CACHE_STALE_SERVED,
    CACHE_REFRESHES,
    CACHE_LOCK_WAITS,
    CACHE_INVALID_ENTRIES,
    JWKS_FETCHES,
    JWKS_FETCH_FAILURES,
    JWKS_KEYS,
    JWT_REJECTED,
)
"""Every metric an event can become, in the order of the docs' table."""

_BREAKER_STATES: Final = tuple(state.value for state in State)

Measurements: TypeAlias = tuple[Measurement, ...]
_E = TypeVar("_E", bound=Event)
# Callables are contravariant in their argument: the table holds each under its own type.
_MAPPERS: dict[type[Event], Callable[[Any], Measurements]] = {}


def _maps(kind: type[_E]) -> Callable[[Callable[[_E], Measurements]], Callable[[_E], Measurements]]:
    def register(mapper: Callable[[_E], Measurements]) -> Callable[[_E], Measurements]:
        _MAPPERS[kind] = mapper
        return mapper

    return register


def measure(event: Event) -> Measurements:
    """Return what *event* adds to the metrics; nothing for an event no metric covers."""
    mapper = _MAPPERS.get(type(event))
    if mapper is None:
        # A subclass of a known event (rare): measured as its parent.
        mapper = next((_MAPPERS[k] for k in type(event).__mro__ if k in _MAPPERS), None)
        if mapper is None:
            return ()
    return mapper(event)


def error_type(error: object) -> str:
    """Return the qualified class name of *error* (builtins go without ``builtins.``)."""
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


@_maps(RateLimited)
def _rate_limited(event: RateLimited) -> Measurements:
    return (Measurement(RATELIMIT_DENIED, (event.policy,)),)


@_maps(BackendFailed)
def _backend_failed(event: BackendFailed) -> Measurements:
    labels = (event.block, event.operation, event.outcome, error_type(event.error))
    return (Measurement(BACKEND_ERRORS, labels),)


@_maps(IdempotencyReplayed)
def _replayed(event: IdempotencyReplayed) -> Measurements:
    return (Measurement(IDEMPOTENCY_DUPLICATES, (event.block, "replayed")),)


@_maps(IdempotencyRejected)
def _duplicate_rejected(event: IdempotencyRejected) -> Measurements:
    return (Measurement(IDEMPOTENCY_DUPLICATES, (event.block, event.reason)),)


@_maps(LeaseLost)
def _lease_lost(event: LeaseLost) -> Measurements:
    return (Measurement(IDEMPOTENCY_LEASES_LOST, (event.block, event.operation)),)


@_maps(IdempotencyNotStored)
def _not_stored(event: IdempotencyNotStored) -> Measurements:
    return (Measurement(IDEMPOTENCY_NOT_STORED, (event.block, event.outcome)),)


@_maps(BackendDataLost)
def _data_lost(event: BackendDataLost) -> Measurements:
    return (Measurement(BACKEND_DATA_LOST, (event.block,)),)


@_maps(BreakerStateChanged)
def _state_changed(event: BreakerStateChanged) -> Measurements:
    states = _BREAKER_STATES if event.new in _BREAKER_STATES else (*_BREAKER_STATES, event.new)
    return (
        Measurement(BREAKER_TRANSITIONS, (event.name, event.old, event.new)),
        *(
            Measurement(BREAKER_STATE, (event.name, state), 1.0 if state == event.new else 0.0)
            for state in states
        ),
    )


@_maps(CallRejected)
def _rejected(event: CallRejected) -> Measurements:
    return (Measurement(BREAKER_REJECTED, (event.name,)),)


def _call(name: str, outcome: str, duration: float | None) -> Measurements:
    labels = (name, outcome)
    if duration is None:  # the breaker does not time its calls
        return (Measurement(BREAKER_CALLS, labels),)
    return (
        Measurement(BREAKER_CALLS, labels),
        Measurement(BREAKER_CALL_DURATION, labels, duration),
    )


@_maps(CallFailed)
def _call_failed(event: CallFailed) -> Measurements:
    if event.error is not None:
        outcome = "error"
    elif event.slow:
        outcome = "slow"
    else:  # a result the breaker's failure_when refused
        outcome = "failure"
    return _call(event.name, outcome, event.duration)


@_maps(CallSucceeded)
def _call_succeeded(event: CallSucceeded) -> Measurements:
    return _call(event.name, "success", event.duration)


@_maps(RetryScheduled)
def _retry_scheduled(event: RetryScheduled) -> Measurements:
    cause = error_type(event.cause) if isinstance(event.cause, BaseException) else "result"
    return (
        Measurement(RETRY_SCHEDULED, (event.name, cause)),
        Measurement(RETRY_WAIT, (event.name,), event.wait),
    )


@_maps(RetryGaveUp)
def _retry_gave_up(event: RetryGaveUp) -> Measurements:
    return (Measurement(RETRY_GAVE_UP, (event.name, event.reason)),)


@_maps(RetryBudgetExhausted)
def _budget_exhausted(event: RetryBudgetExhausted) -> Measurements:
    return (Measurement(RETRY_BUDGET_EXHAUSTED, (event.name,)),)


@_maps(CacheHit)
def _cache_hit(event: CacheHit) -> Measurements:
    return (Measurement(CACHE_LOOKUPS, ("hit",)),)


@_maps(CacheMiss)
def _cache_miss(event: CacheMiss) -> Measurements:
    return (Measurement(CACHE_LOOKUPS, ("miss",)),)


@_maps(StaleServed)
def _stale_served(event: StaleServed) -> Measurements:
    served = Measurement(CACHE_STALE_SERVED, (event.reason,))
    if event.reason == "error":  # after a miss, already counted as a lookup
        return (served,)
    # Served instead of a hit or a miss: counted once in the lookups, so they sum to all.
    return (Measurement(CACHE_LOOKUPS, ("stale",)), served)


@_maps(CacheRefreshed)
def _cache_refreshed(event: CacheRefreshed) -> Measurements:
    return (Measurement(CACHE_REFRESHES, (event.reason,)),)


@_maps(CacheLockWait)
def _cache_lock_wait(event: CacheLockWait) -> Measurements:
    return (Measurement(CACHE_LOCK_WAITS, ()),)


@_maps(CacheEntryInvalid)
def _cache_entry_invalid(event: CacheEntryInvalid) -> Measurements:
    return (Measurement(CACHE_INVALID_ENTRIES, (event.reason,)),)


@_maps(KeySetFetched)
def _key_set_fetched(event: KeySetFetched) -> Measurements:
    return (
        Measurement(JWKS_FETCHES, (event.url,)),
        Measurement(JWKS_KEYS, (event.url,), float(event.keys)),
    )


@_maps(KeySetFetchFailed)
def _key_set_fetch_failed(event: KeySetFetchFailed) -> Measurements:
    labels = (event.url, event.outcome, error_type(event.error))
    return (Measurement(JWKS_FETCH_FAILURES, labels),)


@_maps(TokenRejected)
def _token_rejected(event: TokenRejected) -> Measurements:
    return (Measurement(JWT_REJECTED, (event.reason,)),)


_NAMESPACE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def check_namespace(namespace: object) -> str:
    """Return *namespace* if both Prometheus and OpenTelemetry accept it as a name prefix."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        msg = (
            "namespace must start with a letter and hold only letters, digits and "
            f"underscores, not {namespace!r}"
        )
        raise ConfigurationError(msg)
    return namespace
