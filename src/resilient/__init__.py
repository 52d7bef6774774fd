"""resilient: composable resilience middleware for ASGI services.

Each block works alone or composed, on an in-process backend by default and on Redis
(standalone or Cluster) when several processes must agree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from resilient.__about__ import __version__
from resilient.backends import MemoryBackend, RedisBackend
from resilient.breaker import BreakerRegistry, CircuitBreaker
from resilient.cache import Cache, cached
from resilient.clock import Clock, SystemClock
from resilient.errors import (
    BackendError,
    BackendUnavailable,
    CircuitOpenError,
    ConfigurationError,
    Forbidden,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyMismatch,
    InvalidToken,
    KeySetUnavailable,
    RateLimitExceeded,
    ResilienceError,
    ResultNotStored,
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
from resilient.retries import RetryBudget, retry

if TYPE_CHECKING:
    from resilient.auth import (
        JWKSClient,
        JWTAuthMiddleware,
        JWTValidator,
        SyncJWKSClient,
        SyncJWTValidator,
        authorize,
    )
    from resilient.httpx import ResilientTransport, SyncResilientTransport

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BreakerRegistry",
    "Cache",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "ConfigurationError",
    "Decision",
    "Event",
    "Forbidden",
    "IdempotencyConflict",
    "IdempotencyError",
    "IdempotencyMiddleware",
    "IdempotencyMismatch",
    "InvalidToken",
    "JWKSClient",
    "JWTAuthMiddleware",
    "JWTValidator",
    "KeyFunc",
    "KeySetUnavailable",
    "LoggingObserver",
    "MemoryBackend",
    "Observer",
    "Rate",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "RateLimiter",
    "RedisBackend",
    "ResilienceError",
    "ResilientTransport",
    "ResultNotStored",
    "RetryBudget",
    "Rule",
    "SlidingWindow",
    "SyncJWKSClient",
    "SyncJWTValidator",
    "SyncResilientTransport",
    "SystemClock",
    "TokenBucket",
    "__version__",
    "authorize",
    "by_header",
    "by_ip",
    "by_user",
    "cached",
    "idempotent",
    "rate_limit",
    "retry",
]

# Names whose module needs an optional dependency, imported on first use: `import
# resilient` must not pay for importing httpx, PyJWT or cryptography.
_LAZY = {
    "JWKSClient": "resilient.auth",
    "JWTAuthMiddleware": "resilient.auth",
    "JWTValidator": "resilient.auth",
    "ResilientTransport": "resilient.httpx",
    "SyncJWKSClient": "resilient.auth",
    "SyncJWTValidator": "resilient.auth",
    "SyncResilientTransport": "resilient.httpx",
    "authorize": "resilient.auth",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'resilient' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
