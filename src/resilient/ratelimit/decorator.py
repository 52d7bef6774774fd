"""``@rate_limit``: rate-limit calls of an async function."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from resilient._templates import key_function
from resilient.errors import RateLimitExceeded
from resilient.ratelimit.core import Policy, validate_cost, validate_policies
from resilient.ratelimit.limiter import RateLimiter

__all__ = ["rate_limit"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def rate_limit(
    limiter: RateLimiter,
    *policies: Policy,
    key: str | Callable[..., str],
    cost: int = 1,
) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
    """Admit calls of the decorated ``async def`` within *policies*, per *key*.

    *key* is a template formatted with the call's arguments (``"user:{user_id}"``) or a
    callable given the same arguments as the function. A denied call raises
    :class:`~resilient.RateLimitExceeded` (with ``retry_after``) without running the
    function. When the backend fails, the limiter's ``on_backend_error`` decides.

    >>> from resilient import RateLimiter, TokenBucket
    >>> limiter = RateLimiter()
    >>> @rate_limit(limiter, TokenBucket("5/second"), key="tenant:{tenant}")
    ... async def export(tenant: str) -> None: ...
    """
    validate_policies(policies)
    validate_cost(cost, policies)
    # One policy, where the backend allows it: admitted at once, without a full check.
    admit = limiter.admitter(policies[0], cost=cost) if len(policies) == 1 else None

    def decorate(function: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
        if not inspect.iscoroutinefunction(function):
            msg = f"rate_limit decorates async functions; {function!r} is not one"
            raise TypeError(msg)
        key_of = key_function(key, function)

        @functools.wraps(function)
        async def limited(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            name = key_of(*args, **kwargs)
            if admit is None or admit(name) is None:
                # The full check: a denial, or a key that hit() refuses (a key function may
                # return anything), which it says.
                decision = await limiter.hit(name, *policies, cost=cost)
                if not decision.allowed:
                    raise RateLimitExceeded(decision)
            return await function(*args, **kwargs)

        return limited

    return decorate
