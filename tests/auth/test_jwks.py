"""JWKSClient: caching, single flight, network rules, discovery, several issuers."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from resilient.auth import JWKSClient, JWTValidator, SyncJWKSClient, SyncJWTValidator
from resilient.auth.jwks import parse_key_set, parse_max_age
from resilient.errors import (
    BadAudience,
    BadIssuer,
    ConfigurationError,
    KeySetUnavailable,
    UnknownKey,
)
from resilient.events import Event, KeySetFetched, KeySetFetchFailed, TokenRejected
from resilient.testing import FakeClock, LocalIssuer


@pytest.mark.parametrize(
    "url",
    [
        "http://issuer.example/jwks.json",
        "ftp://issuer.example/jwks.json",
        "file:///etc/passwd",
        "https:///no-host",
        "http://10.0.0.1/jwks.json",
    ],
)
def test_only_https_or_loopback_http_is_fetched(url: str) -> None:
    with pytest.raises(ConfigurationError, match="https"):
        JWKSClient(url)


@pytest.mark.parametrize(
    "url",
    ["https://issuer.example/jwks", "http://127.0.0.1:8/k", "http://[::1]/k", "http://localhost/k"],
)
def test_https_and_loopback_urls_are_accepted(url: str) -> None:
    assert JWKSClient(url).url == url


@pytest.mark.parametrize(
    "options",
    [
        {"min_ttl": -1},
        {"min_ttl": 10, "max_ttl": 5},
        {"timeout": 0},
        {"max_bytes": 0},
        {"refetch_cooldown": -1},
        {"stale_for": float("nan")},
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        JWKSClient("https://issuer.example/jwks", **options)  # type: ignore[arg-type]


def test_validator_options_are_checked_at_construction(jwks: JWKSClient) -> None:
    options: list[dict[str, Any]] = [
        {"leeway": -1},
        {"leeway": 3600},
        {"max_token_bytes": 10},
        {"issuer": ""},
        {"audience": []},
    ]
    for option in options:
        kwargs: dict[str, Any] = {"issuer": "https://i.example", "audience": "api", **option}
        with pytest.raises(ConfigurationError):
            JWTValidator(jwks, **kwargs)


@pytest.mark.parametrize(
    ("options", "missing"),
    [
        ({}, "issuer= and audience="),
        ({"issuer": "https://i.example"}, "audience="),
        ({"audience": "api"}, "issuer="),
    ],
)
@pytest.mark.parametrize(
    ("kind", "source"),
    [(JWTValidator, JWKSClient), (SyncJWTValidator, SyncJWKSClient)],
)
def test_a_validator_without_issuer_or_audience_says_which_is_missing(
    kind: type[JWTValidator | SyncJWTValidator],
    source: type[JWKSClient | SyncJWKSClient],
    options: dict[str, str],
    missing: str,
) -> None:
    jwks = source("https://i.example/jwks")
    with pytest.raises(ConfigurationError) as refused:
        kind(jwks, **options)  # type: ignore[arg-type]
    assert str(refused.value).startswith(f"{kind.__name__} is missing {missing}: ")
    assert "_Validation" not in str(refused.value)
    if "audience" in missing:
        assert "None for tokens without aud" in str(refused.value)


async def test_concurrent_callers_share_one_fetch(
    validator: JWTValidator, issuer: LocalIssuer
) -> None:
    tokens = [issuer.mint(alg=alg) for alg in ("RS256", "ES256", "EdDSA") for _ in range(20)]
    results = await asyncio.gather(*(validator.validate(t) for t in tokens))
    assert len(results) == 60
    assert issuer.fetches == 1


async def test_cache_control_max_age_is_honoured(issuer: LocalIssuer, clock: FakeClock) -> None:
    issuer.max_age = 120
    jwks = JWKSClient(issuer.jwks_url, clock=clock)
    await jwks.get_key(issuer.kid())
    clock.advance(119)
    await jwks.get_key(issuer.kid())
    assert issuer.fetches == 1
    clock.advance(1)
    await jwks.get_key(issuer.kid())
    assert issuer.fetches == 2


async def test_max_age_is_clamped_to_the_bounds(issuer: LocalIssuer, clock: FakeClock) -> None:
    issuer.max_age = 1
    jwks = JWKSClient(issuer.jwks_url, min_ttl=60, max_ttl=600, clock=clock)
    await jwks.get_key(issuer.kid())
    clock.advance(59)
    await jwks.get_key(issuer.kid())
    assert issuer.fetches == 1
    issuer.max_age = 10**9
    clock.advance(1)
    await jwks.get_key(issuer.kid())
    clock.advance(599)
    await jwks.get_key(issuer.kid())
    assert issuer.fetches == 2
    clock.advance(1)
    await jwks.get_key(issuer.kid())
    assert issuer.fetches == 3


async def test_without_cache_control_the_default_ttl_applies(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    issuer.max_age = None
    jwks = JWKSClient(issuer.jwks_url, default_ttl=100, clock=clock)
    await jwks.get_key(issuer.kid())
    clock.advance(99)
    await jwks.get_key(issuer.kid())
    clock.advance(1)
    await jwks.get_key(issuer.kid())
    assert issuer.fetches == 2


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("public, max-age=600", 600),
        ('max-age="60", must-revalidate', 60),
        ("no-store", 0),
        ("private, no-cache", 0),
        ("s-maxage=5", None),
        ("max-age=abc", None),
    ],
)
def test_parse_max_age(header: str | None, expected: int | None) -> None:
    assert parse_max_age(header) == expected


async def test_redirects_are_not_followed(issuer: LocalIssuer, clock: FakeClock) -> None:
    with LocalIssuer(clock=clock) as other:
        issuer.redirect_to = other.jwks_url
        jwks = JWKSClient(issuer.jwks_url, clock=clock)
        with pytest.raises(KeySetUnavailable):
            await jwks.get_key(other.kid())
        assert other.fetches == 0


async def test_an_injected_client_does_not_follow_redirects_either(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    with LocalIssuer(clock=clock) as other:
        issuer.redirect_to = other.jwks_url
        async with httpx.AsyncClient(follow_redirects=True) as http:
            jwks = JWKSClient(issuer.jwks_url, http, clock=clock)
            with pytest.raises(KeySetUnavailable):
                await jwks.get_key(other.kid())
        assert other.fetches == 0


async def test_an_injected_client_is_used(issuer: LocalIssuer, clock: FakeClock) -> None:
    async with httpx.AsyncClient() as http:
        jwks = JWKSClient(issuer.jwks_url, http, clock=clock)
        assert (await jwks.get_key(issuer.kid())).kty == "RSA"


async def test_an_oversized_key_set_is_refused(issuer: LocalIssuer, clock: FakeClock) -> None:
    issuer.padding = 5000
    jwks = JWKSClient(issuer.jwks_url, max_bytes=4096, clock=clock)
    with pytest.raises(KeySetUnavailable) as caught:
        await jwks.get_key(issuer.kid())
    assert "larger than 4096 bytes" in str(caught.value.__cause__)


async def test_an_unreachable_endpoint_is_unavailable(clock: FakeClock) -> None:
    with LocalIssuer(clock=clock) as gone:
        url = gone.jwks_url
    jwks = JWKSClient(url, timeout=2, clock=clock)
    with pytest.raises(KeySetUnavailable):
        await jwks.get_key("any")


async def test_a_key_set_without_usable_keys_keeps_the_last_good_one(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    jwks = JWKSClient(issuer.jwks_url, clock=clock)
    kid = issuer.kid()
    await jwks.get_key(kid)
    issuer.unpublish()  # the issuer now publishes nothing usable
    issuer.publish_jwk({"kty": "oct", "kid": "h", "k": "c2VjcmV0"})
    clock.advance(300)
    assert (await jwks.get_key(kid)).kid == kid
    assert issuer.fetches == 2


def test_unusable_keys_are_dropped_from_a_key_set() -> None:
    assert (
        parse_key_set(
            {
                "keys": [
                    "not a key",
                    {"kty": "RSA"},  # no kid
                    {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
                    {"kty": "EC", "kid": "k1", "crv": "P-521", "x": "AA", "y": "AA"},
                    {"kty": "OKP", "kid": "k2", "crv": "X25519", "x": "AA"},
                    {"kty": "RSA", "kid": "k3", "n": "!!", "e": "AQAB"},
                    {"kty": "RSA", "kid": "k4", "n": "AQAB", "e": "AQAB", "alg": 5},
                ]
            }
        )
        == {}
    )
    documents: list[object] = [[], {"keys": {}}, None]
    for document in documents:
        with pytest.raises(ValueError, match="'keys' list"):
            parse_key_set(document)


async def test_discovery_finds_the_key_set(issuer: LocalIssuer, clock: FakeClock) -> None:
    jwks = await JWKSClient.from_issuer(issuer.issuer, clock=clock)
    assert jwks.url == issuer.jwks_url
    assert (await jwks.get_key(issuer.kid("EdDSA"))).crv == "Ed25519"


async def test_discovery_refuses_a_document_for_another_issuer(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    with pytest.raises(ConfigurationError, match="another issuer"):
        await JWKSClient.from_issuer(issuer.issuer + "/", clock=clock)


async def test_discovery_reports_a_failing_issuer(issuer: LocalIssuer, clock: FakeClock) -> None:
    issuer.fail(503)
    with pytest.raises(KeySetUnavailable, match="discovery"):
        await JWKSClient.from_issuer(issuer.issuer, clock=clock)


async def test_several_issuers_each_with_its_own_keys(clock: FakeClock) -> None:
    with LocalIssuer(clock=clock) as first, LocalIssuer(clock=clock) as second:
        validator = JWTValidator(
            {
                first.issuer: JWKSClient(first.jwks_url, clock=clock),
                second.issuer: JWKSClient(second.jwks_url, clock=clock),
            },
            issuer=[first.issuer, second.issuer],
            audience="api",
            clock=clock,
        )
        assert (await validator.validate(first.mint()))["iss"] == first.issuer
        assert (await validator.validate(second.mint()))["iss"] == second.issuer
        # Signed by the second issuer's key, claiming to be the first: no such key there.
        forged = second.sign(
            {"alg": "RS256", "kid": second.kid()}, first.claims(), key_id=second.kid()
        )
        with pytest.raises(UnknownKey):
            await validator.validate(forged)
        with pytest.raises(BadIssuer):
            await validator.validate(first.mint({"iss": "https://evil.example"}))


async def test_fetches_and_refusals_are_reported_to_the_observer(
    issuer: LocalIssuer, clock: FakeClock
) -> None:
    events: list[Event] = []
    jwks = JWKSClient(issuer.jwks_url, stale_for=600, clock=clock, observer=events.append)
    validator = JWTValidator(
        jwks, issuer=issuer.issuer, audience="api", clock=clock, observer=events.append
    )
    await validator.validate(issuer.mint())
    assert events == [KeySetFetched("jwks", issuer.jwks_url, 3, 300.0)]
    issuer.fail(503)
    clock.advance(300)
    await validator.validate(issuer.mint())
    clock.advance(600)
    with pytest.raises(KeySetUnavailable):
        await validator.validate(issuer.mint())
    issuer.recover()
    clock.advance(30)
    with pytest.raises(BadAudience):
        await validator.validate(issuer.mint({"aud": "other"}))
    failures = [e for e in events if isinstance(e, KeySetFetchFailed)]
    assert [e.outcome for e in failures] == ["stale", "unavailable"]
    assert events[-1] == TokenRejected("jwt", "BadAudience")
