"""SyncJWKSClient and SyncJWTValidator: the async block's behaviours, on threads.

The keys come from a real LocalIssuer over loopback HTTP; time from a FakeClock.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import httpx
import pytest

from resilient import SyncJWKSClient as TopSyncJWKSClient
from resilient.auth import JWKSClient, JWTValidator, SyncJWKSClient, SyncJWTValidator
from resilient.errors import (
    ConfigurationError,
    InvalidToken,
    KeySetUnavailable,
    UnknownKey,
)
from resilient.events import Event, KeySetFetched, KeySetFetchFailed, TokenRejected
from resilient.testing import FakeClock, LocalIssuer
from resilient.testing._issuer import b64url

_T = TypeVar("_T")


def on_threads(calls: list[Callable[[], _T]], threads: int = 16) -> list[_T | BaseException]:
    """Run *calls* on *threads* threads that all start at once; return results or errors."""
    barrier = threading.Barrier(threads)

    def start() -> None:
        barrier.wait()

    def run(call: Callable[[], _T]) -> _T | BaseException:
        try:
            return call()
        except Exception as error:
            return error

    with ThreadPoolExecutor(threads, initializer=start) as pool:
        return list(pool.map(run, calls))


def random_kid_token(issuer: LocalIssuer) -> str:
    # Refused before any signature check, so the signature need not be real.
    header = b64url(json.dumps({"alg": "RS256", "kid": secrets.token_hex(8)}).encode())
    payload = b64url(json.dumps(issuer.claims()).encode())
    return f"{header}.{payload}.{b64url(b'x' * 256)}"


def test_the_sync_names_are_exported_from_the_top() -> None:
    assert TopSyncJWKSClient is SyncJWKSClient


def test_a_good_token_is_accepted_for_every_algorithm(
    sync_validator: SyncJWTValidator, issuer: LocalIssuer
) -> None:
    for alg in ("RS256", "ES256", "EdDSA"):
        assert sync_validator.validate(issuer.mint({"sub": alg}, alg=alg))["sub"] == alg
    assert issuer.fetches == 1


def test_concurrent_threads_share_one_fetch(
    sync_validator: SyncJWTValidator, issuer: LocalIssuer
) -> None:
    tokens = [issuer.mint(alg=alg) for alg in ("RS256", "ES256", "EdDSA") for _ in range(20)]
    results = on_threads([partial(sync_validator.validate, t) for t in tokens])
    assert all(isinstance(r, dict) for r in results), results
    assert issuer.fetches == 1


def test_cache_control_max_age_is_honoured(issuer: LocalIssuer, clock: FakeClock) -> None:
    issuer.max_age = 120
    jwks = SyncJWKSClient(issuer.jwks_url, clock=clock)
    jwks.get_key(issuer.kid())
    clock.advance(119)
    jwks.get_key(issuer.kid())
    assert issuer.fetches == 1
    clock.advance(1)
    jwks.get_key(issuer.kid())
    assert issuer.fetches == 2


def test_max_age_is_clamped_to_the_bounds(issuer: LocalIssuer, clock: FakeClock) -> None:
    issuer.max_age = 1
    jwks = SyncJWKSClient(issuer.jwks_url, min_ttl=60, max_ttl=600, clock=clock)
    jwks.get_key(issuer.kid())
    clock.advance(59)
    jwks.get_key(issuer.kid())
    assert issuer.fetches == 1
    issuer.max_age = 10**9
    clock.advance(1)
    jwks.get_key(issuer.kid())
    clock.advance(599)
    jwks.get_key(issuer.kid())
    assert issuer.fetches == 2
    clock.advance(1)
    jwks.get_key(issuer.kid())
    assert issuer.fetches == 3


def test_without_cache_control_the_default_ttl_applies(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    issuer.max_age = None
    jwks = SyncJWKSClient(issuer.jwks_url, default_ttl=100, clock=clock)
    jwks.get_key(issuer.kid())
    clock.advance(99)
    jwks.get_key(issuer.kid())
    assert issuer.fetches == 1
    clock.advance(1)
    jwks.get_key(issuer.kid())
    assert issuer.fetches == 2


def test_a_burst_of_random_kids_from_many_threads_costs_at_most_one_fetch(
    sync_validator: SyncJWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    good = issuer.mint()
    sync_validator.validate(good)
    assert issuer.fetches == 1
    clock.advance(31)  # past the refetch cooldown: the flood may cause one fetch
    forged = [random_kid_token(issuer) for _ in range(1000)]
    calls: list[Callable[[], object]] = [partial(sync_validator.validate, t) for t in forged]
    calls += [partial(sync_validator.validate, good) for _ in range(50)]
    results = on_threads(calls, threads=32)
    assert all(isinstance(r, UnknownKey) for r in results[:1000])
    assert all(isinstance(r, dict) for r in results[1000:])
    assert issuer.fetches == 2
    # The next flood, inside the cooldown, costs nothing, and good tokens still pass.
    again = on_threads([partial(sync_validator.validate, t) for t in forged[:200]])
    assert all(isinstance(r, UnknownKey) for r in again)
    assert sync_validator.validate(good)
    assert issuer.fetches == 2


def test_a_cold_burst_of_random_kids_from_many_threads_costs_one_fetch(
    sync_validator: SyncJWTValidator, issuer: LocalIssuer
) -> None:
    forged = [random_kid_token(issuer) for _ in range(1000)]
    results = on_threads([partial(sync_validator.validate, t) for t in forged], threads=32)
    assert all(isinstance(r, UnknownKey) for r in results)
    assert issuer.fetches == 1


def test_the_last_good_keys_serve_through_a_5xx_within_the_stale_window(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    jwks = SyncJWKSClient(issuer.jwks_url, stale_for=600, clock=clock)
    validator = SyncJWTValidator(jwks, issuer=issuer.issuer, audience="api", clock=clock)
    validator.validate(issuer.mint())
    issuer.fail(503)
    clock.advance(301)  # the key set expired (max-age=300): a refetch fails
    assert validator.validate(issuer.mint())
    assert issuer.fetches == 2
    clock.advance(10)  # inside the cooldown: no new attempt hammers the failing endpoint
    assert validator.validate(issuer.mint())
    assert issuer.fetches == 2
    clock.advance(30)  # past the cooldown: one more attempt, still served stale
    assert validator.validate(issuer.mint())
    assert issuer.fetches == 3
    clock.advance(600)  # past the stale window: the outage shows
    with pytest.raises(KeySetUnavailable):
        validator.validate(issuer.mint())
    issuer.recover()
    clock.advance(30)
    assert validator.validate(issuer.mint())


def test_a_first_fetch_that_fails_is_reported_and_retried_after_the_cooldown(
    sync_validator: SyncJWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    issuer.fail(502)
    with pytest.raises(KeySetUnavailable):
        sync_validator.validate(issuer.mint())
    with pytest.raises(KeySetUnavailable):
        sync_validator.validate(issuer.mint())
    assert issuer.fetches == 1
    issuer.recover()
    clock.advance(30)
    assert sync_validator.validate(issuer.mint())
    assert issuer.fetches == 2


def test_a_rotated_key_is_picked_up_without_a_restart(
    sync_validator: SyncJWTValidator, issuer: LocalIssuer, clock: FakeClock
) -> None:
    old = issuer.mint()
    sync_validator.validate(old)
    clock.advance(31)
    issuer.rotate("RS256")  # a new kid; the old key leaves the set
    assert sync_validator.validate(issuer.mint())
    assert issuer.fetches == 2
    with pytest.raises(UnknownKey):
        sync_validator.validate(old)


def test_refresh_fetches_now_and_raises_when_it_fails(
    sync_jwks: SyncJWKSClient, issuer: LocalIssuer
) -> None:
    sync_jwks.refresh()
    assert set(sync_jwks.keys) == {issuer.kid(a) for a in ("RS256", "ES256", "EdDSA")}
    issuer.fail(500)
    with pytest.raises(KeySetUnavailable):
        sync_jwks.refresh()
    assert issuer.fetches == 2


def test_redirects_are_not_followed_even_by_an_injected_client(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    with LocalIssuer(clock=clock) as other, httpx.Client(follow_redirects=True) as http:
        issuer.redirect_to = other.jwks_url
        jwks = SyncJWKSClient(issuer.jwks_url, http, clock=clock)
        with pytest.raises(KeySetUnavailable):
            jwks.get_key(other.kid())
        assert other.fetches == 0


def test_an_injected_client_is_used(issuer: LocalIssuer, clock: FakeClock) -> None:
    with httpx.Client() as http:
        jwks = SyncJWKSClient(issuer.jwks_url, http, clock=clock)
        assert jwks.get_key(issuer.kid()).kty == "RSA"
    assert issuer.fetches == 1


def test_an_oversized_key_set_is_refused(issuer: LocalIssuer, clock: FakeClock) -> None:
    issuer.padding = 5000
    jwks = SyncJWKSClient(issuer.jwks_url, max_bytes=4096, clock=clock)
    with pytest.raises(KeySetUnavailable) as caught:
        jwks.get_key(issuer.kid())
    assert "larger than 4096 bytes" in str(caught.value.__cause__)


def test_an_unreachable_endpoint_is_unavailable(clock: FakeClock) -> None:
    with LocalIssuer(clock=clock) as gone:
        url = gone.jwks_url
    jwks = SyncJWKSClient(url, timeout=2, clock=clock)
    with pytest.raises(KeySetUnavailable):
        jwks.get_key("any")


def test_discovery_finds_the_key_set(issuer: LocalIssuer, clock: FakeClock) -> None:
    jwks = SyncJWKSClient.from_issuer(issuer.issuer, clock=clock)
    assert jwks.url == issuer.jwks_url
    assert jwks.get_key(issuer.kid("EdDSA")).crv == "Ed25519"


def test_discovery_refuses_another_issuer_and_reports_a_failing_one(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    with pytest.raises(ConfigurationError, match="another issuer"):
        SyncJWKSClient.from_issuer(issuer.issuer + "/", clock=clock)
    issuer.fail(503)
    with pytest.raises(KeySetUnavailable, match="discovery"):
        SyncJWKSClient.from_issuer(issuer.issuer, clock=clock)


def test_options_are_checked_at_construction_as_for_the_async_client() -> None:
    for options in [{"min_ttl": -1}, {"min_ttl": 10, "max_ttl": 5}, {"timeout": 0}]:
        with pytest.raises(ConfigurationError):
            SyncJWKSClient("https://issuer.example/jwks", **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="https"):
        SyncJWKSClient("http://issuer.example/jwks")


def test_a_key_source_of_the_wrong_kind_is_refused_at_construction(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    sync_jwks = SyncJWKSClient(issuer.jwks_url, clock=clock)
    async_jwks = JWKSClient(issuer.jwks_url, clock=clock)
    with pytest.raises(ConfigurationError, match="use it with a SyncJWTValidator"):
        JWTValidator(sync_jwks, issuer=issuer.issuer, audience="api")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="use it with a JWTValidator"):
        SyncJWTValidator(async_jwks, issuer=issuer.issuer, audience="api")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="use it with a JWTValidator"):
        SyncJWTValidator({issuer.issuer: async_jwks}, issuer=issuer.issuer, audience="api")  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match="no get_key"):
        SyncJWTValidator(object(), issuer=issuer.issuer, audience="api")  # type: ignore[arg-type]
    assert issuer.fetches == 0


def outcome(call: Callable[[], dict[str, Any]]) -> str:
    try:
        return "valid:" + str(call()["sub"])
    except InvalidToken as error:
        return type(error).__name__


async def test_the_sync_and_async_validators_decide_alike(
    validator: JWTValidator, sync_validator: SyncJWTValidator, issuer: LocalIssuer
) -> None:
    tokens = [
        issuer.mint({"sub": "alice"}),
        issuer.mint({"sub": "bob"}, alg="ES256"),
        issuer.mint({"aud": "other"}),
        issuer.mint({"exp": 1}),
        issuer.mint({"nbf": issuer.claims()["iat"] + 3600}),
        issuer.mint({"iss": "https://evil.example"}),
        issuer.mint(headers={"alg": "none"}),
        issuer.mint(headers={"kid": "../../etc/passwd"}),
        issuer.mint(headers={"crit": ["b64"]}),
        issuer.mint(alg="EdDSA")[:-4] + "AAAA",
        random_kid_token(issuer),
        "not.a.token",
    ]
    sync = [outcome(partial(sync_validator.validate, t)) for t in tokens]
    asynchronous = []
    for token in tokens:
        try:
            asynchronous.append("valid:" + str((await validator.validate(token))["sub"]))
        except InvalidToken as error:
            asynchronous.append(type(error).__name__)
    assert sync == asynchronous
    assert sync[:3] == ["valid:alice", "valid:bob", "BadAudience"]
    assert len(set(sync)) >= 8


def test_fetches_and_refusals_are_reported_to_the_observer(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    events: list[Event] = []
    jwks = SyncJWKSClient(issuer.jwks_url, stale_for=600, clock=clock, observer=events.append)
    validator = SyncJWTValidator(
        jwks, issuer=issuer.issuer, audience="api", clock=clock, observer=events.append
    )
    validator.validate(issuer.mint())
    assert events == [KeySetFetched("jwks", issuer.jwks_url, 3, 300.0)]
    issuer.fail(503)
    clock.advance(300)
    validator.validate(issuer.mint())
    clock.advance(600)
    with pytest.raises(KeySetUnavailable):
        validator.validate(issuer.mint())
    failures = [e for e in events if isinstance(e, KeySetFetchFailed)]
    assert [e.outcome for e in failures] == ["stale", "unavailable"]
    issuer.recover()
    clock.advance(30)
    with pytest.raises(InvalidToken):
        validator.validate(issuer.mint({"aud": "other"}))
    assert events[-1] == TokenRejected("jwt", "BadAudience")
