"""The exceptions `resilient` raises, all under one root.

::

    ResilienceError
    ├── ConfigurationError (also a ValueError)   bad arguments, found at construction
    ├── BackendError                             the store failed (Redis down, timeout, ...)
    │   └── BackendUnavailable                   ... and the policy says fail closed
    ├── RateLimitExceeded                        a rate limit denied the call
    ├── CircuitOpenError                         a circuit breaker rejected the call
    └── IdempotencyError                         an idempotent call could not run
        ├── IdempotencyConflict                  ... its key is in progress elsewhere
        └── IdempotencyMismatch                  ... its key was used for another request

Every exception carries a message written for the person reading the log. Exceptions
from a backend's client library (``redis.exceptions.*``) never escape: backends translate
them once, at the edge, into :class:`BackendError` with the original as ``__cause__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resilient.ratelimit.core import Decision

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "CircuitOpenError",
    "ConfigurationError",
    "IdempotencyConflict",
    "IdempotencyError",
    "IdempotencyMismatch",
    "RateLimitExceeded",
    "ResilienceError",
]


class ResilienceError(Exception):
    """The root of every exception raised by `resilient`."""


class ConfigurationError(ResilienceError, ValueError):
    """An argument or a combination of arguments is invalid.

    Raised at construction time, so a misconfigured service fails at start-up rather
    than on its first request. It is also a :class:`ValueError`.
    """


class BackendError(ResilienceError):
    """A backend (Redis, or a user-supplied store) failed to answer.

    ``__cause__`` holds the client library's own exception.
    """


class BackendUnavailable(BackendError):
    """The backend failed and the block is configured to fail closed.

    ``retry_after`` suggests when to try again, in seconds.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitExceeded(ResilienceError):
    """A rate limit denied the call.

    ``decision`` is the full :class:`~resilient.ratelimit.Decision`; ``retry_after`` is
    how many seconds to wait before the same call can be admitted.
    """

    def __init__(self, decision: Decision, message: str | None = None) -> None:
        self.decision = decision
        self.retry_after = decision.retry_after
        super().__init__(
            message
            or f"rate limit exceeded ({decision.policy}); retry in {decision.retry_after:.3f}s"
        )


class CircuitOpenError(ResilienceError):
    """A circuit breaker rejected the call without running it.

    ``breaker`` names the breaker; ``retry_after`` is how many seconds until it lets a
    probe through (0 when it is half-open and only its probe slots are taken).
    """

    def __init__(self, message: str, *, breaker: str, retry_after: float) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.retry_after = retry_after


class IdempotencyError(ResilienceError):
    """An idempotent call could not run, nor replay a stored result."""


class IdempotencyConflict(IdempotencyError):
    """Another call with the same key is still in progress.

    ``retry_after`` is how many seconds to wait before asking again.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyMismatch(IdempotencyError):
    """The key was first used for a different request (another fingerprint)."""
