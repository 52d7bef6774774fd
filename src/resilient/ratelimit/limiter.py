"""The rate limiter: policies checked against a backend, failures handled by policy."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from resilient.backends.memory import MemoryBackend
from resilient.backends.redis import RedisBackend
from resilient.clock import Clock
from resilient.errors import BackendError, BackendUnavailable, ConfigurationError
from resilient.events import BackendFailed, LoggingObserver, Observer, RateLimited, emit
from resilient.ratelimit.core import Decision, Outcome, Policy, _Result, combine
from resilient.ratelimit.memory import name_suffix

__all__ = ["RateLimitStore", "RateLimiter"]

_DEFAULT_OBSERVER = LoggingObserver()
_new = tuple.__new__


@runtime_checkable
class RateLimitStore(Protocol):
    """Where rate-limit state lives. Implement it to plug in another store.

    ``check`` must be atomic per call: it evaluates and charges every policy as one step
    (see :func:`resilient.ratelimit.core.evaluate`). *now_ms* is the time in integer
    milliseconds, or ``None`` for the store's own clock. Failures are raised as
    :class:`~resilient.errors.BackendError`.
    """

    async def check(
        self,
        key: str,
        policies: Sequence[Policy],
        cost: int,
        now_ms: int | None,
        consume: bool,
    ) -> Sequence[Outcome]:
        """Evaluate (and with *consume*, charge) *cost* units of *key* against *policies*."""
        ...

    async def clear(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget the state of *key* for *policies*."""
        ...


def _store_for(backend: MemoryBackend | RedisBackend | RateLimitStore) -> RateLimitStore:
    if isinstance(backend, MemoryBackend):
        from resilient.ratelimit.memory import MemoryRateLimitStore  # noqa: PLC0415

        return backend.store("ratelimit", MemoryRateLimitStore)
    if isinstance(backend, RedisBackend):
        from resilient.ratelimit.redis import RedisRateLimitStore  # noqa: PLC0415

        return backend.store("ratelimit", RedisRateLimitStore)
    if isinstance(backend, RateLimitStore):
        return backend
    msg = (
        f"a rate limiter needs a MemoryBackend, a RedisBackend or a RateLimitStore, not {backend!r}"
    )
    raise ConfigurationError(msg)


class RateLimiter:
    """Check keys against rate-limit policies.

    *backend* is a :class:`~resilient.MemoryBackend` (the default: state in this process),
    a :class:`~resilient.RedisBackend` (shared by every process) or any
    :class:`RateLimitStore`.

    *clock* defaults to the backend's own time: the process's monotonic clock in memory,
    Redis ``TIME`` on Redis (so application servers with skewed clocks agree). Passing a
    clock (:class:`~resilient.testing.FakeClock` in tests) makes every check use its
    ``time()`` instead.

    *on_backend_error* says what a check does when the backend fails: ``"open"`` admits
    the call (a degraded :class:`Decision`, an event and a warning log); ``"closed"``
    raises :class:`~resilient.errors.BackendUnavailable` carrying
    *backend_retry_after* seconds.

    *deny_cache* > 0 keeps up to that many recent denials in process: until its
    ``retry_after`` passes, a denied key is denied again without asking the backend,
    which keeps a key under attack from costing a Redis round trip per request. Every
    denial, from the cache or the backend, emits one :class:`~resilient.events.RateLimited`.

    >>> from resilient import RateLimiter, SlidingWindow
    >>> limiter = RateLimiter()
    >>> # decision = await limiter.hit("user:42", SlidingWindow("100/minute"))
    """

    __slots__ = (
        "_check_now",
        "_deny_cache",
        "_deny_cache_size",
        "_hit_named",
        "_store",
        "backend_retry_after",
        "clock",
        "observer",
        "on_backend_error",
    )

    def __init__(
        self,
        backend: MemoryBackend | RedisBackend | RateLimitStore | None = None,
        *,
        clock: Clock | None = None,
        on_backend_error: Literal["open", "closed"] = "open",
        backend_retry_after: float = 1.0,
        deny_cache: int = 0,
        observer: Observer | None = _DEFAULT_OBSERVER,
    ) -> None:
        if on_backend_error not in ("open", "closed"):
            msg = f"on_backend_error must be 'open' or 'closed', not {on_backend_error!r}"
            raise ConfigurationError(msg)
        if not backend_retry_after > 0:
            msg = (
                "backend_retry_after must be a positive number of seconds, "
                f"not {backend_retry_after!r}"
            )
            raise ConfigurationError(msg)
        if isinstance(deny_cache, bool) or not isinstance(deny_cache, int) or deny_cache < 0:
            msg = f"deny_cache must be an integer >= 0, not {deny_cache!r}"
            raise ConfigurationError(msg)
        self._store = _store_for(MemoryBackend() if backend is None else backend)
        # The memory store never waits: call it without the cost of a coroutine.
        self._check_now = self._hit_named = None
        if type(self._store).__name__ == "MemoryRateLimitStore":
            self._check_now = self._store.check_now  # type: ignore[attr-defined]
            if not deny_cache:  # with one, denials are answered before the store
                self._hit_named = self._store._hit_named  # type: ignore[attr-defined]
        self.clock = clock
        self.on_backend_error = on_backend_error
        self.backend_retry_after = backend_retry_after
        self.observer = observer
        self._deny_cache_size = deny_cache
        self._deny_cache: OrderedDict[tuple[str, tuple[Policy, ...]], tuple[float, Decision]]
        self._deny_cache = OrderedDict()

    async def hit(self, key: str, *policies: Policy, cost: int = 1) -> Decision:
        """Charge *cost* units of *key* against every one of *policies*, atomically.

        If any policy denies, none is charged. Return the :class:`Decision`.
        """
        _validate(key, policies, cost)
        return await self.check(key, policies, cost, consume=True)

    async def peek(self, key: str, *policies: Policy, cost: int = 1) -> Decision:
        """Say whether a hit of *cost* would be admitted now, charging nothing.

        ``remaining`` counts the units left now (before any hit).
        """
        _validate(key, policies, cost)
        return await self.check(key, policies, cost, consume=False)

    async def reset(self, key: str, *policies: Policy) -> None:
        """Forget *key*'s usage of *policies*, as if it had never been seen."""
        _validate(key, policies, 0)
        self._deny_cache.pop((key, policies), None)
        try:
            await self._store.clear(key, policies)
        except BackendError as exc:
            self._backend_failed("reset", exc)
            if self.on_backend_error == "closed":
                raise

    async def check(
        self, key: str, policies: tuple[Policy, ...], cost: int, *, consume: bool
    ) -> Decision:
        """Run a check without validating its arguments (for adapters that did already)."""
        if self._deny_cache_size and consume:
            cached = self._cached_denial(key, policies)
            if cached is not None:
                # A denial all the same: counted like one the store answered.
                self._report_denial(key, cached)
                return cached
        now_ms = self._now_ms()
        if self._check_now is not None:
            outcomes = self._check_now(key, policies, cost, now_ms, consume)
        else:
            try:
                outcomes = await self._store.check(key, policies, cost, now_ms, consume)
            except BackendError as exc:
                return self._on_failure(exc, policies)
        return self._decide(key, policies, outcomes, consume)

    def check_nowait(self, key: str, policies: tuple[Policy, ...], cost: int) -> Decision | None:
        """Admit a check at once when the store can answer without waiting, else None.

        For adapters on the hot path: ``check_nowait(...) or await check(...)`` spares a
        coroutine when the memory store admits a single-policy check. Anything else
        (another store, several policies, a denial, the deny cache) returns ``None``,
        and :meth:`check` gives the full answer.
        """
        if len(policies) != 1:
            return None
        hit = self._hit_named
        if hit is None:
            return None
        policy = policies[0]
        result = hit(key + name_suffix(policy), policy, cost, self._now_ms())
        return None if result is None else _admitted(policy, result)

    def _now_ms(self) -> int | None:
        """Return the injected clock's time in integer milliseconds; None: the store's own."""
        clock = self.clock
        return None if clock is None else math.floor(clock.time() * 1000)

    def _decide(
        self, key: str, policies: tuple[Policy, ...], outcomes: Sequence[Outcome], consume: bool
    ) -> Decision:
        if len(outcomes) == 1:  # combine(), inlined for the common case
            policy, (allowed, remaining, reset_ms, retry_ms) = policies[0], outcomes[0]
            decision: Decision = _new(
                Decision,
                (
                    allowed,
                    policy.capacity,
                    remaining,
                    reset_ms / 1000,
                    retry_ms / 1000,
                    policy,
                    (),
                    False,
                ),
            )
            if allowed:  # the common case: nothing to report, nothing to remember
                return decision
        else:
            decision = combine(policies, outcomes)
        if not decision.allowed and consume:
            self._report_denial(key, decision)
            if self._deny_cache_size:
                self._remember_denial(key, policies, decision)
        return decision

    def _report_denial(self, key: str, decision: Decision) -> None:
        """Emit the one :class:`RateLimited` event of a denial, whoever answered it."""
        if self.observer is not None:
            event = RateLimited("ratelimit", key, decision.policy.name, decision.retry_after)
            emit(self.observer, event)

    def _on_failure(self, exc: BackendError, policies: tuple[Policy, ...]) -> Decision:
        self._backend_failed("check", exc)
        if self.on_backend_error == "closed":
            msg = f"the rate limiter's backend is unavailable: {exc}"
            raise BackendUnavailable(msg, retry_after=self.backend_retry_after) from exc
        first = policies[0]
        return Decision(True, first.capacity, first.capacity, 0.0, 0.0, first, degraded=True)

    def _backend_failed(self, operation: str, exc: BackendError) -> None:
        outcome = "admitted" if self.on_backend_error == "open" else "refused"
        emit(self.observer, BackendFailed("ratelimit", operation, exc, outcome))

    def _monotonic(self) -> float:
        return time.monotonic() if self.clock is None else self.clock.monotonic()

    def _cached_denial(self, key: str, policies: tuple[Policy, ...]) -> Decision | None:
        entry = self._deny_cache.get((key, policies))
        if entry is None:
            return None
        until, decision = entry
        left = until - self._monotonic()
        if left <= 0:
            del self._deny_cache[key, policies]
            return None
        return Decision(
            False,
            decision.limit,
            decision.remaining,
            max(decision.reset_after - (decision.retry_after - left), left),
            left,
            decision.policy,
            decision.details,
        )

    def _remember_denial(self, key: str, policies: tuple[Policy, ...], decision: Decision) -> None:
        cache = self._deny_cache
        cache[key, policies] = (self._monotonic() + decision.retry_after, decision)
        cache.move_to_end((key, policies))
        while len(cache) > self._deny_cache_size:
            cache.popitem(last=False)

    def __repr__(self) -> str:
        return f"RateLimiter({self._store!r}, on_backend_error={self.on_backend_error!r})"


def _admitted(policy: Policy, result: _Result) -> Decision:
    """Return the Decision of a single-policy check that the store admitted at once."""
    return _new(
        Decision, (True, policy.capacity, result[1], result[2] / 1000, 0.0, policy, (), False)
    )


def _validate(key: str, policies: tuple[Policy, ...], cost: int) -> None:
    if not isinstance(key, str) or not key:
        msg = f"a rate-limit key must be a non-empty string, not {key!r}"
        raise ConfigurationError(msg)
    validate_policies(policies)
    validate_cost(cost, policies)


def validate_policies(policies: Sequence[Policy]) -> None:
    """Check that *policies* are distinct :class:`Policy` objects (at least one)."""
    if not policies:
        msg = "give at least one policy, e.g. SlidingWindow('100/minute')"
        raise ConfigurationError(msg)
    seen: set[str] = set()
    for policy in policies:
        if not isinstance(policy, Policy):
            msg = f"not a rate-limit policy: {policy!r}"
            raise ConfigurationError(msg)
        if policy.id in seen:
            msg = f"{policy!r} is given twice: each policy may be checked once per call"
            raise ConfigurationError(msg)
        seen.add(policy.id)


def validate_cost(cost: int, policies: Sequence[Policy]) -> None:
    """Check that *cost* is an integer from 0 to the smallest capacity of *policies*."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        msg = f"cost must be an integer >= 0, not {cost!r}"
        raise ConfigurationError(msg)
    for policy in policies:
        if cost > policy.capacity:
            msg = f"cost {cost} exceeds the capacity of {policy!r}: it could never be admitted"
            raise ConfigurationError(msg)
