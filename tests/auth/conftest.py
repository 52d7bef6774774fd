"""Fixtures: a local issuer on real loopback HTTP, a fake clock shared by everyone, and
the async and sync clients and validators on them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from resilient.auth import JWKSClient, JWTValidator, SyncJWKSClient, SyncJWTValidator
from resilient.testing import FakeClock, LocalIssuer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(clock: FakeClock) -> Iterator[LocalIssuer]:
    with LocalIssuer(clock=clock) as issuer:
        yield issuer


@pytest.fixture
async def jwks(issuer: LocalIssuer, clock: FakeClock) -> AsyncIterator[JWKSClient]:
    async with JWKSClient(issuer.jwks_url, clock=clock) as jwks:
        yield jwks


@pytest.fixture
def validator(jwks: JWKSClient, issuer: LocalIssuer, clock: FakeClock) -> JWTValidator:
    return JWTValidator(jwks, issuer=issuer.issuer, audience="api", clock=clock)


@pytest.fixture
def sync_jwks(issuer: LocalIssuer, clock: FakeClock) -> Iterator[SyncJWKSClient]:
    with SyncJWKSClient(issuer.jwks_url, clock=clock) as jwks:
        yield jwks


@pytest.fixture
def sync_validator(
    sync_jwks: SyncJWKSClient, issuer: LocalIssuer, clock: FakeClock
) -> SyncJWTValidator:
    return SyncJWTValidator(sync_jwks, issuer=issuer.issuer, audience="api", clock=clock)
