"""Rate limiting: sliding windows and token buckets, in memory or on Redis.

* :mod:`~resilient.ratelimit.core`: the pure algorithms (no I/O);
* :class:`RateLimiter`: checks keys against policies on a backend;
* :mod:`~resilient.ratelimit.store`: the protocols of the stores it checks them in;
* :class:`RateLimitMiddleware` and :class:`Rule`: limits at the ASGI edge;
* :func:`rate_limit`: a decorator for async functions.
"""

from __future__ import annotations

from resilient.ratelimit.core import Decision, Policy, Rate, SlidingWindow, TokenBucket
from resilient.ratelimit.decorator import rate_limit
from resilient.ratelimit.limiter import RateLimiter
from resilient.ratelimit.middleware import RateLimitMiddleware, Rule
from resilient.ratelimit.store import ImmediateRateLimitStore, RateLimitStore

__all__ = [
    "Decision",
    "ImmediateRateLimitStore",
    "Policy",
    "Rate",
    "RateLimitMiddleware",
    "RateLimitStore",
    "RateLimiter",
    "Rule",
    "SlidingWindow",
    "TokenBucket",
    "rate_limit",
]
