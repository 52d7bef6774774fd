"""What a rate-limit store provides: the protocols the limiter talks to its stores through.

Every store implements :class:`RateLimitStore`. A store whose state is in this process,
and which can therefore answer without awaiting anything, may also implement
:class:`ImmediateRateLimitStore`: the limiter then checks without a coroutine, and
adapters on the hot path (:class:`~resilient.RateLimitMiddleware`) admit a request with
one call of a function the store prepared. :class:`~resilient.MemoryBackend`'s store
implements both; :class:`~resilient.RedisBackend`'s the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from resilient.ratelimit.core import Charge, Outcome, Policy

__all__ = ["Admit", "ImmediateRateLimitStore", "RateLimitStore"]

Admit: TypeAlias = Callable[[str], Charge | None]
"""A prepared single-policy hit: ``admit(key)`` charges *key* when its policy allows and
returns the :data:`~resilient.ratelimit.core.Charge`; otherwise it changes nothing and
returns ``None``, and the full check answers (see
:meth:`ImmediateRateLimitStore.admitter`)."""


@runtime_checkable
class RateLimitStore(Protocol):
    """Where rate-limit state lives. Implement it to plug in another store.

    ``check`` must be atomic per call: it evaluates and charges every policy as one step
    (see :func:`resilient.ratelimit.core.evaluate`). *now_ms* is the time in integer
    milliseconds, or ``None`` for the store's own clock. Failures are raised as
    :class:`~resilient.errors.BackendError`. The limiter validates keys, policies and
    costs before they reach a store.
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


@runtime_checkable
class ImmediateRateLimitStore(RateLimitStore, Protocol):
    """A store that answers at once, without awaiting: the rate limiter's fast path.

    An optional capability of a :class:`RateLimitStore` whose state is in this process.
    The limiter recognises it by these two methods (``isinstance`` of this protocol) and
    then calls :meth:`check_now` instead of awaiting ``check``, and hands adapters the
    functions :meth:`admitter` prepares (:meth:`~resilient.RateLimiter.admitter`).
    Both must be atomic like ``check``, and answer exactly as it would.
    """

    def check_now(
        self,
        key: str,
        policies: Sequence[Policy],
        cost: int,
        now_ms: int | None,
        consume: bool,
    ) -> Sequence[Outcome]:
        """Do what ``check`` does, without awaiting anything."""
        ...

    def admitter(
        self,
        policy: Policy,
        *,
        cost: int = 1,
        prefix: str = "",
        now_ms: Callable[[], int] | None = None,
    ) -> Admit:
        """Prepare the hit of *cost* units against *policy* for keys starting with *prefix*.

        The returned ``admit(key)`` does, for ``prefix + key``, what
        ``check_now(prefix + key, [policy], cost, now, True)`` does when the policy
        admits, and returns the policy's :data:`~resilient.ratelimit.core.Charge`
        instead of its outcome. When the policy would deny, it changes nothing and
        returns ``None``: the caller asks the full check, which records a block period.
        The time is *now_ms()* (integer milliseconds), or the store's own clock when
        *now_ms* is ``None``. *policy* and *cost* are validated by the caller.

        Preparing spares the hot path the cost of passing and combining what stays the
        same from one request to the next: the name of the key's state is built in one
        step, and nothing but the key is passed.
        """
        ...
