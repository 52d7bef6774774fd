"""resilient: composable resilience middleware for ASGI services.

Each block works alone or composed, on an in-process backend by default and on Redis
(standalone or Cluster) when several processes must agree.
"""

from __future__ import annotations

from resilient.__about__ import __version__
from resilient.backends import MemoryBackend, RedisBackend
from resilient.breaker import BreakerRegistry, CircuitBreaker
from resilient.clock import Clock, SystemClock
from resilient.errors import (
    BackendError,
    BackendUnavailable,
    CircuitOpenError,
    ConfigurationError,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyMismatch,
    RateLimitExceeded,
    ResilienceError,
)
from resilient.events import Event, LoggingObserver, Observer
from resilient.idempotency import IdempotencyMiddleware, idempotent
from resilient.keys import KeyFunc, by_header, by_ip, by_user
from resilient.ratelimit import (
    Decision,
    Rate,
    RateLimiter,
    RateLimitMiddleware,
    Rule,
    SlidingWindow,
    TokenBucket,
    rate_limit,
)
from resilient.retry import RetryBudget, retry

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BreakerRegistry",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "ConfigurationError",
    "Decision",
    "Event",
    "IdempotencyConflict",
    "IdempotencyError",
    "IdempotencyMiddleware",
    "IdempotencyMismatch",
    "KeyFunc",
    "LoggingObserver",
    "MemoryBackend",
    "Observer",
    "Rate",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "RateLimiter",
    "RedisBackend",
    "ResilienceError",
    "RetryBudget",
    "Rule",
    "SlidingWindow",
    "SystemClock",
    "TokenBucket",
    "__version__",
    "by_header",
    "by_ip",
    "by_user",
    "idempotent",
    "rate_limit",
    "retry",
]
