"""The rate limiter: policies checked against a backend, failures handled by policy."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from resilient.backends.memory import MemoryBackend
from resilient.backends.redis import RedisBackend
from resilient.clock import Clock
from resilient.errors import BackendError, BackendUnavailable, ConfigurationError
from resilient.events import BackendFailed, LoggingObserver, Observer, RateLimited, emit
from resilient.ratelimit.core import (
    Charge,
    Decision,
    Outcome,
    Policy,
    combine,
    decision_of,
    validate_cost,
    validate_policies,
)
from resilient.ratelimit.store import Admit, ImmediateRateLimitStore, RateLimitStore

__all__ = ["RateLimitStore", "RateLimiter"]

_DEFAULT_OBSERVER = LoggingObserver()


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
        "_immediate",
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
        number = isinstance(backend_retry_after, int | float) and not isinstance(
            backend_retry_after, bool
        )
        if not number or not 0 < backend_retry_after < math.inf:
            msg = (
                "backend_retry_after must be a positive number of seconds, "
                f"not {backend_retry_after!r}"
            )
            raise ConfigurationError(msg)
        if clock is not None and not isinstance(clock, Clock):
            msg = f"clock must be a Clock, with monotonic() and time(), not {clock!r}"
            raise ConfigurationError(msg)
        if observer is not None and not callable(observer):
            msg = f"observer must be a callable taking an event, or None, not {observer!r}"
            raise ConfigurationError(msg)
        if isinstance(deny_cache, bool) or not isinstance(deny_cache, int) or deny_cache < 0:
            msg = f"deny_cache must be an integer >= 0, not {deny_cache!r}"
            raise ConfigurationError(msg)
        store = _store_for(MemoryBackend() if backend is None else backend)
        self._store = store
        # A store that answers at once (the memory store) is called without the cost of a
        # coroutine: the fast-path protocol, recognised by its methods.
        self._immediate = store if isinstance(store, ImmediateRateLimitStore) else None
        self._check_now = None if self._immediate is None else self._immediate.check_now
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
        return self._answer_now(key, policies, cost, True) or await self._await_store(
            key, policies, cost, True
        )

    async def peek(self, key: str, *policies: Policy, cost: int = 1) -> Decision:
        """Say whether a hit of *cost* would be admitted now, charging nothing.

        ``remaining`` counts the units left now (before any hit).
        """
        _validate(key, policies, cost)
        return self._answer_now(key, policies, cost, False) or await self._await_store(
            key, policies, cost, False
        )

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

    def admitter(self, policy: Policy, *, cost: int = 1, prefix: str = "") -> Admit | None:
        """Prepare hits of *cost* units against *policy* for a hot path, if there is one.

        For adapters that check the same policy on every request, as
        :class:`~resilient.RateLimitMiddleware` does. The function returned, called as
        ``admit(key)``, charges ``prefix + key`` when *policy* allows, at once (no
        coroutine, no :class:`Decision`), and returns the policy's
        :data:`~resilient.ratelimit.core.Charge`: ``[1]`` is the units remaining, ``[2]``
        the milliseconds until the quota is full again. Otherwise it changes nothing and
        returns ``None``, and ``await limiter.hit(prefix + key, policy, cost=cost)`` gives
        the full answer: the denial, its event and its block period (or the error of a
        key :meth:`hit` refuses). Both count against the same state.

        Return ``None`` where there is no such path: when the backend's store is not an
        :class:`~resilient.ratelimit.store.ImmediateRateLimitStore` (Redis), and when the
        limiter keeps a deny cache (which answers denials before the store, in
        :meth:`hit`). *policy* and *cost* are validated here, once; the function keeps
        the limiter's clock as it is when the function is made.

        >>> from resilient import TokenBucket
        >>> admit = RateLimiter().admitter(TokenBucket("10/second"), prefix="ip:")
        >>> admit("203.0.113.7")[1]   # units remaining
        9
        """
        if not isinstance(prefix, str):
            msg = f"prefix must be a string, not {prefix!r}"
            raise ConfigurationError(msg)
        validate_policies((policy,))
        validate_cost(cost, (policy,))
        immediate = self._immediate
        if immediate is None or self._deny_cache_size:
            return None
        clock = self.clock
        if clock is None:
            admit = immediate.admitter(policy, cost=cost, prefix=prefix)
        else:

            def now_ms() -> int:
                return math.floor(clock.time() * 1000)

            admit = immediate.admitter(policy, cost=cost, prefix=prefix, now_ms=now_ms)
        if prefix:
            return admit

        def admit_key(key: str) -> Charge | None:
            # Without a prefix, the key alone names the state: one that hit() refuses
            # (empty, or not a string) is left to hit(), which says why.
            return admit(key) if type(key) is str and key else None

        return admit_key

    def _answer_now(
        self, key: str, policies: tuple[Policy, ...], cost: int, consume: bool
    ) -> Decision | None:
        """Answer a check at once if the deny cache or the store can; else return None.

        A plain function, so that a check the memory store answers costs no coroutine
        besides the caller's. ``None``: :meth:`_await_store` answers.
        """
        if self._deny_cache_size and consume:
            cached = self._cached_denial(key, policies)
            if cached is not None:
                # A denial all the same: counted like one the store answered.
                self._report_denial(key, cached)
                return cached
        check_now = self._check_now
        if check_now is None:
            return None
        try:
            outcomes = check_now(key, policies, cost, self._now_ms(), consume)
        except BackendError as exc:
            return self._on_failure(exc, policies)
        return self._decide(key, policies, outcomes, consume)

    async def _await_store(
        self, key: str, policies: tuple[Policy, ...], cost: int, consume: bool
    ) -> Decision:
        """Answer a check by awaiting the store (one that cannot answer at once)."""
        try:
            outcomes = await self._store.check(key, policies, cost, self._now_ms(), consume)
        except BackendError as exc:
            return self._on_failure(exc, policies)
        return self._decide(key, policies, outcomes, consume)

    def _now_ms(self) -> int | None:
        """Return the injected clock's time in integer milliseconds; None: the store's own."""
        clock = self.clock
        return None if clock is None else math.floor(clock.time() * 1000)

    def _decide(
        self, key: str, policies: tuple[Policy, ...], outcomes: Sequence[Outcome], consume: bool
    ) -> Decision:
        if len(outcomes) == 1:  # combine(), unfolded for the common case
            allowed, remaining, reset_ms, retry_ms = outcomes[0]
            decision = decision_of(policies[0], allowed, remaining, reset_ms, retry_ms)
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
        return decision_of(first, True, first.capacity, 0, 0, degraded=True)

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
        reset_after = max(decision.reset_after - (decision.retry_after - left), left)
        return decision._replace(reset_after=reset_after, retry_after=left)

    def _remember_denial(self, key: str, policies: tuple[Policy, ...], decision: Decision) -> None:
        cache = self._deny_cache
        cache[key, policies] = (self._monotonic() + decision.retry_after, decision)
        cache.move_to_end((key, policies))
        while len(cache) > self._deny_cache_size:
            cache.popitem(last=False)

    def __repr__(self) -> str:
        return f"RateLimiter({self._store!r}, on_backend_error={self.on_backend_error!r})"


def _validate(key: str, policies: tuple[Policy, ...], cost: int) -> None:
    # The common case first, in a few steps: a key, one policy, a cost it can take.
    if len(policies) == 1 and type(key) is str and key and type(cost) is int:
        policy = policies[0]
        if isinstance(policy, Policy) and 0 <= cost <= policy.capacity:
            return
    if not isinstance(key, str) or not key:
        msg = f"a rate-limit key must be a non-empty string, not {key!r}"
        raise ConfigurationError(msg)
    validate_policies(policies)
    validate_cost(cost, policies)
