"""The exceptions `resilient` raises, all under one root.

::

    ResilienceError
    ├── ConfigurationError (also a ValueError)   bad arguments, found at construction
    ├── BackendError                             the store failed (Redis down, timeout, ...)
    │   └── BackendUnavailable                   ... and the policy says fail closed
    ├── RateLimitExceeded                        a rate limit denied the call
    ├── CircuitOpenError                         a circuit breaker rejected the call
    ├── IdempotencyError                         an idempotent call could not run
    │   ├── IdempotencyConflict                  ... its key is in progress elsewhere
    │   ├── IdempotencyMismatch                  ... its key was used for another request
    │   └── ResultNotStored                      ... it ran, but its result could not be stored
    ├── KeySetUnavailable                        no usable JWKS: fetch failed, nothing stale
    ├── Forbidden                                a valid token lacks a scope, role or group
    └── InvalidToken                             a bearer token was refused
        ├── MalformedToken                       ... it is not a well-formed, small JWS
        ├── DisallowedAlgorithm                  ... its alg is not allowed or fits no key
        ├── UnknownKey                           ... its kid is in no published key set
        ├── BadSignature                         ... its signature does not verify
        ├── ExpiredToken                         ... its exp has passed
        ├── NotYetValid                          ... its nbf or iat is in the future
        ├── MissingClaim                         ... a required claim is absent
        ├── BadIssuer                            ... its iss is not the expected issuer
        ├── BadAudience                          ... its aud (or client_id) is not ours
        └── WrongTokenUse                        ... e.g. an ID token where an access token
                                                     is expected

Names: a family, and a failure of the library's machinery or configuration, ends in
``Error`` (``ResilienceError``, ``ConfigurationError``, ``BackendError``,
``IdempotencyError``); a refusal is named for what happened (``RateLimitExceeded``,
``BackendUnavailable``, ``IdempotencyConflict``, ``ExpiredToken``, ``Forbidden``), as
``except RateLimitExceeded:`` reads. ``CircuitOpenError`` keeps the name breaker users
look for (pybreaker's ``CircuitBreakerError``, Polly's ``BrokenCircuitException``).

The message of an :class:`InvalidToken` is safe to show to the client (it never echoes
the token, a key or a claim's value): ``JWTAuthMiddleware`` puts it in the
``error_description`` of its ``WWW-Authenticate`` header.

Every exception carries a message written for the person reading the log. Exceptions
from a backend's client library (``redis.exceptions.*``) never escape: backends translate
them once, at the edge, into :class:`BackendError` with the original as ``__cause__``.

Every exception pickles, with its message and its attributes (``retry_after``,
``breaker``, ``decision``, ``claim``, ``missing``, ...), so it can cross a process
boundary: a Celery task's failure, a :mod:`multiprocessing` or
:mod:`concurrent.futures` worker's. As for any exception, ``__cause__``,
``__context__`` and the traceback stay behind.
"""

from __future__ import annotations

import copyreg
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resilient.ratelimit.core import Decision

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BadAudience",
    "BadIssuer",
    "BadSignature",
    "CircuitOpenError",
    "ConfigurationError",
    "DisallowedAlgorithm",
    "ExpiredToken",
    "Forbidden",
    "IdempotencyConflict",
    "IdempotencyError",
    "IdempotencyMismatch",
    "InvalidToken",
    "KeySetUnavailable",
    "MalformedToken",
    "MissingClaim",
    "NotYetValid",
    "RateLimitExceeded",
    "ResilienceError",
    "ResultNotStored",
    "UnknownKey",
    "WrongTokenUse",
]


class ResilienceError(Exception):
    """The root of every exception raised by `resilient`."""

    def __reduce__(self) -> tuple[Any, ...]:
        # An exception pickles as `type(self)(*self.args)`, which a constructor taking
        # keyword-only arguments (`retry_after=`), or other arguments than the message
        # (`decision`, `claim`), cannot take. Rebuild it without calling the constructor:
        # its arguments are `args` again, its attributes its `__dict__` (notes included).
        # (copyreg.__newobj__ is what pickle itself uses; typeshed leaves it out.)
        rebuild = copyreg.__newobj__  # type: ignore[attr-defined]
        return (rebuild, (type(self), *self.args), self.__dict__ or None)


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


class ResultNotStored(IdempotencyError):
    """The call ran, but its result could not be stored before its lease ran out.

    The store failed (or the lease was lost) through every retry, so nothing records
    that the call ran: a later call with the key may run it again. ``retry_after`` is how
    many seconds to wait before trying again.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KeySetUnavailable(ResilienceError):
    """No key set can be used: the JWKS endpoint failed and no stale copy is recent enough.

    A server-side outage, not the client's fault: answer 503, not 401. ``__cause__``
    holds the fetch's own error.
    """


class InvalidToken(ResilienceError):
    """A bearer token was refused; the message is safe to show to the client.

    ``error`` is the OAuth error code of RFC 6750 (always ``"invalid_token"``), for the
    ``WWW-Authenticate`` header.
    """

    error = "invalid_token"
    default_message = "the token is invalid"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def description(self) -> str:
        """The message, for the ``error_description`` of a ``WWW-Authenticate`` header."""
        return str(self)


class MalformedToken(InvalidToken):
    """The token is not a compact JWS of three base64url parts with a JSON header, or too big."""

    default_message = "the token is malformed"


class DisallowedAlgorithm(InvalidToken):
    """The header's ``alg`` is not in the allow-list, or does not fit the signing key."""

    default_message = "the token's signing algorithm is not allowed"


class UnknownKey(InvalidToken):
    """The header's ``kid`` names no key of the issuer's published key set."""

    default_message = "the token's signing key is unknown"


class BadSignature(InvalidToken):
    """The signature does not verify with the issuer's key."""

    default_message = "the token's signature is invalid"


class ExpiredToken(InvalidToken):
    """The ``exp`` claim is in the past (beyond the leeway)."""

    default_message = "the token has expired"


class NotYetValid(InvalidToken):
    """The ``nbf`` claim, or the ``iat`` claim, is in the future (beyond the leeway)."""

    default_message = "the token is not valid yet"


class MissingClaim(InvalidToken):
    """A required claim is absent or has the wrong type; ``claim`` names it."""

    def __init__(self, claim: str, message: str | None = None) -> None:
        super().__init__(message or f"the token has no valid {claim!r} claim")
        self.claim = claim


class BadIssuer(InvalidToken):
    """The ``iss`` claim is not the expected issuer."""

    default_message = "the token was issued by an unexpected issuer"


class BadAudience(InvalidToken):
    """The ``aud`` claim (or Cognito's ``client_id``) is not one this service accepts."""

    default_message = "the token is not meant for this audience"


class WrongTokenUse(InvalidToken):
    """The token is of the wrong kind, e.g. an ID token where an access token is expected."""

    default_message = "the token is of the wrong kind"


class Forbidden(ResilienceError):
    """A valid token lacks a required scope, role or group (HTTP 403).

    ``missing`` lists what is missing (``"scope:orders:read"``, ``"role:admin"``,
    ``"group:staff"``); ``error`` is RFC 6750's ``"insufficient_scope"``. The message is
    safe to show to the client.
    """

    error = "insufficient_scope"

    def __init__(self, message: str, *, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing
