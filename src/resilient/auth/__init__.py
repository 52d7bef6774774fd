"""Authentication: JWTs validated against an issuer's JWKS.

* :class:`JWKSClient`: an issuer's signing keys, fetched with httpx, cached, single-flight,
  flood-proof and outage-tolerant (:mod:`resilient.auth.jwks`);
* :class:`JWTValidator`: ``await validator.validate(token) -> claims``, every known JWT
  attack refused by default (:mod:`resilient.auth.jwt`);
* :class:`JWTAuthMiddleware`: bearer tokens checked at the edge of an ASGI application,
  the principal put in the scope in Starlette's shape (:mod:`resilient.auth.middleware`);
* :func:`requires`: scopes, roles and groups an endpoint needs (403 otherwise).

This package needs PyJWT and httpx (``pip install 'resilient-asgi[jwt]'``); ``import
resilient`` does not import it.
"""

from __future__ import annotations

from resilient.auth.jwks import JWKSClient, SigningKey
from resilient.auth.jwt import ASYMMETRIC_ALGORITHMS, JWTValidator, KeySource
from resilient.auth.middleware import (
    AuthCredentials,
    JWTAuthMiddleware,
    JWTUser,
    UnauthenticatedUser,
)
from resilient.auth.requires import Requirement, requires

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
    "UnauthenticatedUser",
    "requires",
]
