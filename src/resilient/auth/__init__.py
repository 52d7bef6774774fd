"""Authentication: JWTs validated against an issuer's JWKS.

* :class:`JWKSClient`: an issuer's signing keys, fetched with httpx, cached, single-flight,
  flood-proof and outage-tolerant (:mod:`resilient.auth.jwks`; the decisions are made
  without I/O by :mod:`resilient.auth.core`);
* :class:`JWTValidator`: ``await validator.validate(token) -> claims``, every known JWT
  attack refused by default (:mod:`resilient.auth.jwt`);
* :class:`SyncJWKSClient` and :class:`SyncJWTValidator`: their twins for code without an
  event loop, ``validator.validate(token) -> claims``, with the same checks and the same
  cache decisions (logic once, I/O twice);
* :class:`JWTAuthMiddleware`: bearer tokens checked at the edge of an ASGI application,
  the principal put in the scope in Starlette's shape (:mod:`resilient.auth.middleware`);
* :func:`authorize`: scopes, roles and groups an endpoint needs (403 otherwise), as a
  decorator or a FastAPI dependency.

This package needs PyJWT and httpx (``pip install 'resilient-asgi[jwt]'``); ``import
resilient`` does not import it.
"""

from __future__ import annotations

from resilient.auth.authorization import Requirement, authorize
from resilient.auth.jwks import JWKSClient, SigningKey, SyncJWKSClient
from resilient.auth.jwt import (
    ASYMMETRIC_ALGORITHMS,
    JWTValidator,
    KeySource,
    SyncJWTValidator,
    SyncKeySource,
)
from resilient.auth.middleware import (
    AuthCredentials,
    JWTAuthMiddleware,
    JWTUser,
    UnauthenticatedUser,
)

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "AuthCredentials",
    "JWKSClient",
    "JWTAuthMiddleware",
    "JWTUser",
    "JWTValidator",
    "KeySource",
    "Requirement",
    "SigningKey",
    "SyncJWKSClient",
    "SyncJWTValidator",
    "SyncKeySource",
    "UnauthenticatedUser",
    "authorize",
]
