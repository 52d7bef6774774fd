"""The httpx client a JWKS client fetches with: one per client, made on its first fetch,
closed with it. Most tests run through ``JWKSClient`` and ``SyncJWKSClient`` alike.

The issuer keeps connections alive (HTTP/1.1), as real ones do, and counts them, so a
test sees which connections a client leaves open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from resilient.auth import JWKSClient, SyncJWKSClient
from resilient.auth.core import SigningKey
from resilient.errors import KeySetUnavailable
from resilient.events import Event, KeySetFetchFailed
from resilient.testing import FakeClock, LocalIssuer


@pytest.fixture
def issuer(clock: FakeClock) -> Iterator[LocalIssuer]:
    with LocalIssuer(clock=clock, keep_alive=True) as issuer:
        yield issuer


@pytest.fixture(params=[JWKSClient, SyncJWKSClient], ids=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> type[JWKSClient | SyncJWKSClient]:
    kind: type[JWKSClient | SyncJWKSClient] = request.param
    return kind


async def get_key(jwks: JWKSClient | SyncJWKSClient, kid: str) -> SigningKey:
    if isinstance(jwks, JWKSClient):
        return await jwks.get_key(kid)
    return jwks.get_key(kid)


async def close(jwks: JWKSClient | SyncJWKSClient) -> None:
    if isinstance(jwks, JWKSClient):
        await jwks.aclose()
    else:
        jwks.close()


def wait_until_closed(issuer: LocalIssuer) -> None:
    """Wait (on the real clock: the server is a real thread) for its connections to end."""
    deadline = time.monotonic() + 10
    while issuer.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)


async def test_a_client_makes_one_httpx_client_on_its_first_fetch_and_closes_it(
    kind: type[JWKSClient | SyncJWKSClient],
    issuer: LocalIssuer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[httpx.Client | httpx.AsyncClient] = []  # the real clients, counted as made
    for name in ("Client", "AsyncClient"):
        real = getattr(httpx, name)

        class Counted(real):  # type: ignore[misc,valid-type]
            def __init__(self, *args: Any, **options: Any) -> None:
                super().__init__(*args, **options)
                made.append(self)

        monkeypatch.setattr(httpx, name, Counted)
    jwks = kind(issuer.jwks_url, clock=clock)
    assert made == []
    for _ in range(3):
        await get_key(jwks, issuer.kid())
        clock.advance(300)  # the keys expire: the next lookup fetches again
    assert issuer.fetches == 3
    assert len(made) == 1
    assert not made[0].is_closed
    await close(jwks)
    assert made[0].is_closed


async def test_no_connection_is_kept_open_between_fetches(
    kind: type[JWKSClient | SyncJWKSClient], issuer: LocalIssuer, clock: FakeClock
) -> None:
    jwks = kind(issuer.jwks_url, clock=clock)
    for fetches in (1, 2):
        await get_key(jwks, issuer.kid())
        wait_until_closed(issuer)
        assert (issuer.fetches, issuer.connections, issuer.open_connections) == (fetches,) * 2 + (
            0,
        )
        clock.advance(300)
    await close(jwks)


def test_an_async_client_fetches_from_one_event_loop_after_another(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    jwks = JWKSClient(issuer.jwks_url, clock=clock)
    for _ in range(3):  # as scripts and tests do: asyncio.run, again and again
        assert asyncio.run(jwks.get_key(issuer.kid())).kid == issuer.kid()
        clock.advance(300)
    assert issuer.fetches == 3
    asyncio.run(jwks.aclose())


async def test_a_closed_client_fetches_no_more_and_serves_its_keys_as_through_an_outage(
    kind: type[JWKSClient | SyncJWKSClient], issuer: LocalIssuer, clock: FakeClock
) -> None:
    events: list[Event] = []
    jwks = kind(issuer.jwks_url, stale_for=600, clock=clock, observer=events.append)
    kid = issuer.kid()
    await get_key(jwks, kid)
    await close(jwks)
    assert (await get_key(jwks, kid)).kid == kid  # fresh: no fetch needed
    clock.advance(300)
    assert (await get_key(jwks, kid)).kid == kid  # expired: served stale
    clock.advance(600)
    with pytest.raises(KeySetUnavailable) as refused:
        await get_key(jwks, kid)
    assert "is closed" in str(refused.value.__cause__)
    assert issuer.fetches == 1
    failures = [e for e in events if isinstance(e, KeySetFetchFailed)]
    assert [e.outcome for e in failures] == ["stale", "unavailable"]
    await close(jwks)  # closing again is harmless


async def test_a_client_given_as_http_is_used_and_left_open(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    async with httpx.AsyncClient() as http:
        jwks = JWKSClient(issuer.jwks_url, http, clock=clock)
        await jwks.get_key(issuer.kid())
        await jwks.aclose()
        assert not http.is_closed
        assert (await http.get(issuer.jwks_url)).status_code == 200
    assert issuer.connections == 1  # the given client's connection served both


def test_a_sync_client_given_as_http_is_used_and_left_open(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    with httpx.Client() as http:
        jwks = SyncJWKSClient(issuer.jwks_url, http, clock=clock)
        jwks.get_key(issuer.kid())
        jwks.close()
        assert not http.is_closed
        assert http.get(issuer.jwks_url).status_code == 200
    assert issuer.connections == 1  # the given client's connection served both


async def test_leaving_the_with_block_closes_the_client(issuer: LocalIssuer) -> None:
    async with JWKSClient(issuer.jwks_url) as jwks:
        await jwks.get_key(issuer.kid())
    with SyncJWKSClient(issuer.jwks_url) as sync_jwks:
        sync_jwks.get_key(issuer.kid())
    wait_until_closed(issuer)
    assert (issuer.connections, issuer.open_connections) == (2, 0)
    with pytest.raises(KeySetUnavailable):
        await jwks.refresh()
    with pytest.raises(KeySetUnavailable):
        sync_jwks.refresh()


async def test_discovery_leaves_no_connection_open(
    kind: type[JWKSClient | SyncJWKSClient], issuer: LocalIssuer, clock: FakeClock
) -> None:
    if kind is JWKSClient:
        jwks: JWKSClient | SyncJWKSClient = await JWKSClient.from_issuer(issuer.issuer, clock=clock)
    else:
        jwks = SyncJWKSClient.from_issuer(issuer.issuer, clock=clock)
    wait_until_closed(issuer)
    assert (issuer.connections, issuer.open_connections) == (1, 0)  # the discovery's, closed
    await get_key(jwks, issuer.kid())
    await close(jwks)
    wait_until_closed(issuer)
    assert (issuer.connections, issuer.open_connections) == (2, 0)
